"""Prefect flows over the TextCAM library: the audit, its deployment, the demo and CLI plug-ins.

Importing the package sets offline defaults for Prefect (see :mod:`flows.settings`) where the
user has not set them; Prefect reads its settings when it is first imported, so this runs first.
"""

from flows.settings import apply_offline_defaults

apply_offline_defaults()
