"""The HTML audit report (Jinja2 templates + static assets, rendered by one function)."""

from reports.render import render_report

__all__ = ["render_report"]
