"""Model-behaviour evidence: CMH statistics against a plain loop, Otsu cut-offs, the stepwise rule."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tasks.behaviour import (
    ProbeBehaviour,
    _cmh_z,
    _effects,
    _strata,
    _tables,
    evidence_grid,
    model_evidence,
    over_threshold,
    probe_behaviour,
)
from textcam.visibility import PhraseVisibility, otsu_thresholds


def _reference(x: np.ndarray, pred: np.ndarray, labels: np.ndarray, c: int, p: int) -> tuple[float, float]:
    """CMH z and the own-label MH risk difference, one stratum (= label) at a time."""
    num = var = rd_num = rd_den = 0.0
    for y in np.unique(labels):
        s = labels == y
        n = s.sum()
        n1 = x[s, p].sum()
        m = (pred[s] == c).sum()
        a = (x[s, p] & (pred[s] == c)).sum()
        num += a - n1 * m / n
        if n > 1:
            var += n1 * (n - n1) * m * (n - m) / (n * n * (n - 1))
        if y == c:
            n0, a0 = n - n1, m - a
            rd_num += (a * n0 - a0 * n1) / n
            rd_den += n1 * n0 / n
    return num / math.sqrt(var), rd_num / rd_den


def test_cmh_and_risk_difference_match_a_plain_loop() -> None:
    rng = np.random.default_rng(0)
    n, k, p = 400, 3, 5
    labels = rng.integers(0, k, n)
    x = rng.random((n, p)) < 0.4
    pred = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    stratum, stratum_label = _strata(labels, x, [])
    tables = _tables(stratum, stratum_label, pred, k, x)
    z = _cmh_z(tables)
    rd, other = _effects(tables, k)
    for c in range(k):
        for j in range(p):
            want_z, want_rd = _reference(x, pred, labels, c, j)
            assert z[c, j] == pytest.approx(want_z, rel=1e-9)
            assert rd[c, j] == pytest.approx(want_rd, rel=1e-9, abs=1e-12)
            # The other-label effect is the own-label one of "labelled otherwise" against predicted c.
            mask = labels != c
            rd_num = rd_den = 0.0
            for y in np.unique(labels[mask]):
                s = labels == y
                nn, n1 = s.sum(), x[s, j].sum()
                a = (x[s, j] & (pred[s] == c)).sum()
                mm = (pred[s] == c).sum()
                rd_num += a - mm * n1 / nn
                rd_den += n1 * (nn - n1) / nn
            assert other[c, j] == pytest.approx(rd_num / rd_den, rel=1e-9, abs=1e-12)


def test_otsu_splits_two_clusters_between_them() -> None:
    rng = np.random.default_rng(1)
    col = np.concatenate([rng.normal(0.1, 0.01, 300), rng.normal(0.4, 0.01, 100)])
    cut = otsu_thresholds(np.stack([col, -col], 1))
    assert 0.15 < cut[0] < 0.35
    assert -0.35 < cut[1] < -0.15
    with pytest.raises(ValueError):
        otsu_thresholds(np.zeros((1, 3)))


def test_presence_keeps_the_top_mode_where_the_present_side_holds_two() -> None:
    from textcam.visibility import presence_mixture

    rng = np.random.default_rng(2)
    # "red" as CLIP 2 sees it: far colours at -0.45, near ones (purple, yellow) at -0.07, red at 0.18.
    own = np.r_[rng.normal(-0.45, 0.08, 400), rng.normal(-0.07, 0.05, 400), rng.normal(0.18, 0.03, 200)]
    # a binary attribute: absent and present, the present side one wide mode.
    binary = np.r_[rng.normal(-0.3, 0.08, 500), rng.normal(0.2, 0.06, 500)]
    # "with a logo" as CLIP 2 sees it: two present modes, the lower one the logos that also have a border
    # (10.8 pooled sds above the absent images, 4.6 below the top mode): the phrase, seen a little less.
    shifted = np.r_[
        rng.normal(-0.245, 0.043, 500), rng.normal(0.109, 0.017, 150), rng.normal(0.182, 0.015, 350)
    ]
    sim = np.stack([own, binary, shifted], 1)
    weights, means, sds = presence_mixture(sim)
    assert weights.shape == means.shape == sds.shape == (3, 3)
    assert weights[:, 0] == pytest.approx([0.4, 0.4, 0.2], abs=0.03)
    assert means[-1, 0] == pytest.approx(0.18, abs=0.01)
    assert weights[1, 1] == 0.0 and weights[-1, 1] == pytest.approx(0.5, abs=0.03)  # not split
    assert weights[1, 2] == 0.0 and weights[-1, 2] == pytest.approx(0.5, abs=0.03)  # not split either
    vis = PhraseVisibility(torch.zeros(3, 1), weights, means, sds)
    present = vis._posterior(sim) > 0.5
    assert present[:800, 0].mean() < 0.01 and present[800:, 0].mean() > 0.99
    assert present[:500, 1].mean() < 0.01 and present[500:, 1].mean() > 0.99
    assert present[:500, 2].mean() < 0.01 and present[500:, 2].mean() > 0.99


def _world(n: int = 1200, used: float = 1.0, seed: int = 0) -> tuple[ProbeBehaviour, np.ndarray]:
    """Two classes; phrase 0 a cue the model uses for class 1 with probability ``used``, phrase 1 a
    filler independent of everything, phrase 2 present exactly when phrase 0 is absent (rides on it)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    cue = rng.random(n) < 0.5
    filler = rng.random(n) < 0.5
    pred = labels.copy()
    shortcut = rng.random(n) < used
    pred[cue & shortcut] = 1
    pred[~cue & shortcut] = 0
    x = np.stack([cue, filler, ~cue], 1)
    behaviour = ProbeBehaviour(x, ["cue", "filler", "rider"], pred, labels, np.zeros(3))
    return behaviour, np.ones((2, 3, 2), dtype=bool)


def test_a_used_cue_is_accepted_a_filler_and_a_rider_are_not() -> None:
    behaviour, eligible = _world()
    ev = model_evidence(behaviour, 2, eligible, n_permutations=50)
    acc = ev[ev["accepted"]]
    assert set(zip(acc["class_index"], acc["phrase"], acc["direction"], strict=True)) == {
        (1, "cue", "for"),
        (0, "cue", "against"),
    }
    cue = ev[(ev["class_index"] == 1) & (ev["phrase"] == "cue") & (ev["direction"] == "for")].iloc[0]
    assert cue["effect"] == pytest.approx(1.0)
    assert cue["step"] == 1
    rider = ev[(ev["class_index"] == 0) & (ev["phrase"] == "rider") & (ev["direction"] == "for")].iloc[0]
    assert rider["effect_first"] == pytest.approx(1.0)  # alone it looks like a cue...
    assert rider["proxy_of"] == 0  # ...but where it is seen is where the cue is not: the cue's proxy
    assert evidence_grid(behaviour, 2, eligible, n_permutations=50).alias_names("cue") == ["not rider"]
    assert not rider["accepted"]
    filler = ev[ev["phrase"] == "filler"]
    assert not filler["accepted"].any()
    assert (filler["z_first"].abs() < 4).all()


def test_the_phrase_the_explanations_name_goes_first() -> None:
    """ "proxy" is present exactly where the cue is, "cue" on 70 % of those images: by z the proxy wins
    and explains the cue away; when the explanations name "cue" (and only then), it is accepted first,
    and "proxy", whose presence agrees with the cue's (phi 0.65), is its proxy and not flagged."""
    rng = np.random.default_rng(3)
    n = 2000
    labels = rng.integers(0, 2, n)
    truth = rng.random(n) < 0.5
    pred = np.where(truth, 1, labels)
    x = np.stack([truth & (rng.random(n) < 0.7), truth, rng.random(n) < 0.5], 1)
    behaviour = ProbeBehaviour(x, ["cue", "proxy", "filler"], pred, labels, np.zeros(3))
    eligible = np.ones((2, 3, 2), dtype=bool)
    asked: list[np.ndarray] = []

    def names_cue(pairs: np.ndarray) -> np.ndarray:
        asked.append(pairs.copy())
        named = np.zeros_like(pairs)
        named[:, 0, :] = True
        return named

    plain = evidence_grid(behaviour, 2, eligible, n_permutations=30)
    named = evidence_grid(behaviour, 2, eligible, n_permutations=30, support=names_cue)
    nobody = evidence_grid(behaviour, 2, eligible, n_permutations=30, support=np.zeros_like)
    assert plain.given[0] == 1 and not plain.accepted[:, 0, :].any()
    assert named.given == [0] and named.accepted[1, 0, 0] and not named.accepted[:, 1, :].any()
    assert (named.figures["proxy_of"][:, 1, :] == 0).all()
    # The flag says what else CLIP calls the concept: the proxy, with its agreement (phi of 0.7 of the
    # images against all of them: sqrt(0.7 · 0.5 / (0.5 · 0.65)) ≈ 0.68, computed within labels).
    ((j, agreement),) = named.aliases[0]
    assert j == 1 and agreement == pytest.approx(0.68, abs=0.03)
    assert named.alias_names("cue") == ["proxy"] and named.alias_names("filler") == []
    assert plain.alias_names("proxy") == ["cue"] and plain.alias_names("unknown") == []
    assert nobody.given == plain.given
    assert all(a.shape == (2, 3, 2) for a in asked) and asked[0][1, 0, 0]  # asked about passing pairs


def test_an_unused_cue_and_ineligible_pairs_are_not_accepted() -> None:
    behaviour, eligible = _world(used=0.0)
    assert not model_evidence(behaviour, 2, eligible, n_permutations=50)["accepted"].any()
    behaviour, eligible = _world()
    eligible[:, 0, :] = False  # e.g. the cue names a class, or is not in the explanations
    ev = model_evidence(behaviour, 2, eligible, n_permutations=50)
    assert not ev.loc[ev["phrase"] == "cue", "accepted"].any()


def test_a_weak_effect_is_not_accepted_however_significant() -> None:
    behaviour, eligible = _world(n=20000, used=0.1)
    ev = model_evidence(behaviour, 2, eligible, n_permutations=20, min_effect=0.2)
    cue = ev[(ev["class_index"] == 1) & (ev["phrase"] == "cue") & (ev["direction"] == "for")].iloc[0]
    assert cue["z_first"] > cue["threshold"]  # significant...
    assert cue["effect_first"] < 0.2  # ...but small
    assert not ev["accepted"].any()


def test_a_tie_with_the_null_is_not_over_it() -> None:
    """One image shows the phrase and a third of the images are taken for class 1. Every permutation that
    moves it onto another such image reproduces the observed table, so a third of the null's maxima equal
    the observed z, and the 99th percentile is that value: a permutation test must not reject. The two are
    computed along different paths (here the observed z is 2e-16 over the threshold), and a tie decided
    by float error flagged a distractor word in a control world (seed 30, c03)."""
    n = 90
    pred = np.zeros(n, dtype=int)
    pred[:30] = 1
    x = np.zeros((n, 1), dtype=bool)
    x[0, 0] = True
    behaviour = ProbeBehaviour(x, ["rare"], pred, np.zeros(n, dtype=int), np.zeros(1))
    ev = evidence_grid(behaviour, 2, np.ones((2, 1, 2), dtype=bool), min_effect=0.0, seed=5)
    z, threshold = ev.figures["z_model"][1, 0, 0], ev.figures["threshold"][1, 0, 0]
    assert z == pytest.approx(math.sqrt(2), abs=1e-12) and threshold == pytest.approx(math.sqrt(2), abs=1e-12)
    assert not ev.accepted.any()
    assert over_threshold([3.0 + 1e-12, 3.1], 3.0).tolist() == [False, True]


def _names(phrases: list[int]) -> Callable[[np.ndarray], np.ndarray]:
    """A :data:`Support` under which the explanations name ``phrases`` for every class, both ways."""

    def support(pairs: np.ndarray) -> np.ndarray:
        out = np.zeros_like(pairs)
        out[:, phrases, :] = True
        return out

    return support


def test_a_weak_named_effect_passes_only_when_the_probe_was_trained_on() -> None:
    """In-sample the effect shrinks: with ``named_min_effect`` the cue the explanations name passes for its
    class on its significance alone (not against the other, a mirror); the filler they also name has no
    significance, and unnamed pairs still need 0.2."""
    behaviour, eligible = _world(n=20000, used=0.1)
    named = _names([0, 1])
    trained = evidence_grid(behaviour, 2, eligible, n_permutations=20, support=named, named_min_effect=0.0)
    assert trained.given == [0] and trained.accepted[1, 0, 0]
    assert trained.accepted.sum() == 1
    effect = trained.figures["effect"][1, 0, 0]
    assert 0 < effect < 0.2
    for support, named_min_effect in ((_names([1]), 0.0), (named, None)):
        ev = evidence_grid(
            behaviour, 2, eligible, n_permutations=20, support=support, named_min_effect=named_min_effect
        )
        assert not ev.accepted.any()
    # a named pair with a bound of its own passes only if its effect does
    for bound, passes in ((effect - 0.01, True), (effect + 0.01, False)):
        ev = evidence_grid(behaviour, 2, eligible, n_permutations=20, support=named, named_min_effect=bound)
        assert bool(ev.accepted[1, 0, 0]) is passes and ev.accepted.sum() == passes


def test_weak_named_evidence_goes_after_every_strong_pair() -> None:
    """A weakly used cue with the larger z waits until the strongly used one is accepted."""
    rng = np.random.default_rng(4)
    n = 20000
    labels = rng.integers(0, 2, n)
    strong, weak = rng.random(n) < 0.01, rng.random(n) < 0.5
    pred = labels.copy()
    pred[strong & (rng.random(n) < 0.6)] = 1
    pred[weak & (rng.random(n) < 0.15)] = 0
    x = np.stack([weak, strong], 1)
    behaviour = ProbeBehaviour(x, ["weak", "strong"], pred, labels, np.zeros(2))
    eligible = np.ones((2, 2, 2), dtype=bool)
    named = _names([0, 1])
    ev = evidence_grid(behaviour, 2, eligible, n_permutations=20, support=named, named_min_effect=0.0)
    first = ev.figures["z_first"]
    assert first[0, 0, 0] > first[1, 1, 0]  # by z alone the weak cue would go first
    assert ev.given == [1, 0]
    assert ev.accepted[1, 1, 0] and ev.accepted[0, 0, 0]
    assert ev.figures["effect"][0, 0, 0] < 0.2 <= ev.figures["effect"][1, 1, 0]


def test_without_labels_one_stratum() -> None:
    behaviour, eligible = _world()
    unlabelled = ProbeBehaviour(
        behaviour.presence, behaviour.phrases, behaviour.predictions, None, np.zeros(3)
    )
    ev = model_evidence(unlabelled, 2, eligible, n_permutations=50)
    assert ((ev["class_index"] == 1) & (ev["phrase"] == "cue") & ev["accepted"]).any()


def test_bad_input() -> None:
    behaviour, eligible = _world(n=50)
    with pytest.raises(ValueError, match="eligible"):
        model_evidence(behaviour, 2, eligible[:, :2])
    with pytest.raises(ValueError, match="alpha"):
        model_evidence(behaviour, 2, eligible, alpha=1.5)
    with pytest.raises(ValueError):
        ProbeBehaviour(behaviour.presence, ["a"], behaviour.predictions, None, np.zeros(3))
    with pytest.raises(ValueError, match="different CLIP"):
        probe_behaviour(torch.zeros(4, 8), np.zeros(4), ["a"], torch.zeros(1, 6))


def test_visibility_shows_seen_and_strong_phrases_only() -> None:
    text = torch.eye(3)
    probe = torch.cat([torch.eye(3).repeat(20, 1), torch.ones(5, 3)])
    vis = PhraseVisibility.fit(probe, text)
    images = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    indices = torch.tensor([[0, 1, -1], [0, 1, 2]])
    scores = torch.tensor([[1.0, 0.9, 0.0], [1.0, 0.3, 0.0]])
    shown = vis.visible(images, indices, scores)
    assert shown.tolist() == [[True, False, False], [False, False, False]]
    assert vis.visible(images, indices, scores, min_ratio=0.0)[1].tolist() == [False, True, False]
    # seen: CLIP's call alone, whatever the weight ("b" in image 2 at 0.3 of the first phrase)
    assert vis.seen(images, indices).tolist() == [[True, False, False], [False, True, False]]


def test_label_accuracy_counts_only_labelled_images() -> None:
    from tasks.behaviour import ProbeBehaviour

    presence = np.zeros((5, 1), dtype=bool)
    pred = np.array([0, 1, 1, 2, 0])
    labels = np.array([0, 1, 2, -1, -1])
    probe = ProbeBehaviour(presence, ["p"], pred, labels, np.zeros(1))
    assert probe.label_accuracy() == pytest.approx(2 / 3)
    assert ProbeBehaviour(presence, ["p"], pred, None, np.zeros(1)).label_accuracy() is None
    unknown = ProbeBehaviour(presence, ["p"], pred, np.full(5, -1), np.zeros(1))
    assert unknown.label_accuracy() is None


def test_a_memorised_probe_drawn_from_the_audit_warns_and_a_separate_one_does_not(caplog, tmp_path) -> None:
    from tasks.behaviour import ProbeBehaviour
    from tasks.config import AuditConfig
    from tasks.flag_inputs import warn_if_memorised

    labels = np.arange(200) % 4
    presence = np.zeros((200, 1), dtype=bool)
    perfect = ProbeBehaviour(presence, ["p"], labels.copy(), labels, np.zeros(1))
    wrong = labels.copy()
    wrong[:10] = (wrong[:10] + 1) % 4  # 95% right
    usual = ProbeBehaviour(presence, ["p"], wrong, labels, np.zeros(1))
    own = AuditConfig(data="x")
    separate = own.replace(calibration={"probe": str(tmp_path / "probe.csv")})
    with caplog.at_level("WARNING", logger="tasks.flag_inputs"):
        assert warn_if_memorised(own, perfect)
        assert not warn_if_memorised(separate, perfect)
        assert not warn_if_memorised(own, usual)
    assert len(caplog.records) == 1 and "100.0% of the audited images" in caplog.records[0].getMessage()
    assert "flags.probe_seen_in_training" in caplog.records[0].getMessage()  # what the user can say
    caplog.clear()
    with caplog.at_level("WARNING", logger="tasks.flag_inputs"):
        assert warn_if_memorised(own.replace(flags={"probe_seen_in_training": True}), perfect)
    assert "probe_seen_in_training" not in caplog.records[0].getMessage()  # said already


def _mirror_world(n: int = 24000) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a cue, a filler and predictions: four classes, the model takes a third of the class-0
    images that show the cue for class 3."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, n)
    cue, filler = rng.random(n) < 0.5, rng.random(n) < 0.5
    pred = labels.copy()
    pred[(labels == 0) & cue & (rng.random(n) < 0.33)] = 3
    return labels, cue, filler, pred


def test_a_named_pair_goes_with_its_phrase_when_a_mirror_passes_first() -> None:
    """Four classes; the model takes a third of the class-0 images that show the cue for class 3: strong
    evidence *against* class 0 (about 0.33), weak *for* class 3 (about a third of that, over the other
    three labels). Accepting the phrase for its mirror must not close the cue's own pair where the
    explanations name it; without that only the mirror is accepted."""
    labels, cue, filler, pred = _mirror_world()
    behaviour = ProbeBehaviour(np.stack([cue, filler], 1), ["cue", "filler"], pred, labels, np.zeros(2))
    eligible = np.ones((4, 2, 2), dtype=bool)
    bare = evidence_grid(behaviour, 4, eligible, n_permutations=20, min_effect=0.2)
    assert np.argwhere(bare.accepted).tolist() == [[0, 0, 1]]
    effect = bare.figures["effect"][3, 0, 0]
    assert 0.05 < effect < 0.2 and bare.figures["effect"][0, 0, 1] > 0.2
    named = _names([0])
    ev = evidence_grid(
        behaviour, 4, eligible, n_permutations=20, min_effect=0.2, support=named, named_min_effect=0.0
    )
    assert np.argwhere(ev.accepted).tolist() == [[0, 0, 1], [3, 0, 0]] and ev.given == [0]


def test_a_named_pair_goes_with_its_phrase_under_another_name() -> None:
    """As above, but CLIP has two names for the cue ("word" is called wherever "cue" is): class 0's
    explanations name the word, class 3's the cue. The word is accepted for its mirror, and the cue, its
    proxy, must keep class 3's named pair; without that the cue is closed as a proxy for every class."""
    labels, cue, filler, pred = _mirror_world()
    x = np.stack([cue, cue, filler], 1)
    behaviour = ProbeBehaviour(x, ["word", "cue", "filler"], pred, labels, np.zeros(3))

    def named(pairs: np.ndarray) -> np.ndarray:
        out = np.zeros_like(pairs)
        out[0, 0, :] = out[3, 1, :] = True
        return out

    options = {"n_permutations": 20, "min_effect": 0.2, "support": named}
    bare = evidence_grid(behaviour, 4, np.ones((4, 3, 2), dtype=bool), **options)
    ev = evidence_grid(behaviour, 4, np.ones((4, 3, 2), dtype=bool), **options, named_min_effect=0.0)
    assert bare.given == ev.given == [0] and np.argwhere(bare.accepted).tolist() == [[0, 0, 1]]
    assert np.argwhere(ev.accepted).tolist() == [[0, 0, 1], [3, 1, 0]]
    assert 0.05 < ev.figures["effect"][3, 1, 0] < 0.2 and np.isnan(ev.figures["proxy_of"][3, 1, 0])
    assert ev.figures["proxy_of"][0, 1, 1] == 0 and ev.alias_names("word") == ["cue"]
    assert ev.alias_names("cue") == ["word"] and ev.alias_names("filler") == []  # class 3's flag reads so


def _size_world(n: int = 24000, owner: str = "against") -> tuple[ProbeBehaviour, np.ndarray]:
    """Four classes and a two-valued attribute that CLIP calls exactly ("small", "large": complements),
    and a filler. ``owner`` "against": the model calls 60% of the small class-2 images something else,
    mostly class 0 (class 2 relies on "large"); "for": it takes 30% of the other classes' small images
    for class 0."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, n)
    small, filler = rng.random(n) < 0.5, rng.random(n) < 0.5
    pred = labels.copy()
    if owner == "against":
        moved = (labels == 2) & small & (rng.random(n) < 0.6)
        pred[moved] = np.where(rng.random(n) < 0.7, 0, rng.choice([1, 3], n))[moved]
    else:
        pred[(labels != 0) & small & (rng.random(n) < 0.3)] = 0
    x = np.stack([small, ~small, filler], 1)
    behaviour = ProbeBehaviour(x, ["small", "large", "filler"], pred, labels, np.zeros(3))
    return behaviour, np.ones((4, 3, 2), dtype=bool)


def test_the_finding_s_owner_reads_a_complement_against_it_as_held() -> None:
    """Class 2 relies on "large". Where the explanations name only "small", "small" is accepted, and its
    strongest pair is against class 2: the owner reads it as its complement, "large" for class 2, the
    same flag for class 2 as where the explanations name nothing (the pair *for* is taken first then)."""
    behaviour, eligible = _size_world()
    options = {"n_permutations": 20, "min_effect": 0.1}
    named = evidence_grid(behaviour, 4, eligible, **options, support=_names([0]))
    bare = evidence_grid(behaviour, 4, eligible, **options)
    assert named.given == [0] and bare.given == [1]
    # Class 0's mirror reads in the accepted word either way: "small" for it, or "large" against it.
    assert np.argwhere(named.accepted).tolist() == [[0, 0, 0], [2, 1, 0]]
    assert np.argwhere(bare.accepted).tolist() == [[0, 1, 1], [2, 1, 0]]
    assert named.figures["z_model"][2, 1, 0] == pytest.approx(named.figures["z_model"][2, 0, 1])
    assert named.alias_names("large") == ["not small"]  # what the flag card says it was read from
    # Class 2's pair against "small" is decided as the proxy of its flag, and says so.
    assert named.figures["proxy_of"][2, 0, 1] == 1 and named.agreement(0, 1) == pytest.approx(-1.0)


def test_a_mirror_against_a_class_is_not_read_as_its_complement() -> None:
    """Class 0 relies on "small" (its pair *for* is the strongest); the pairs against the other classes are
    its mirrors and stay as they read: no class is flagged for "large"."""
    behaviour, eligible = _size_world(owner="for")
    ev = evidence_grid(behaviour, 4, eligible, n_permutations=20, min_effect=0.2, support=_names([0]))
    assert ev.given == [0] and ev.accepted[0, 0, 0]
    assert not ev.accepted[:, 1, :].any() and ev.accepted[1:, 0, 1].any()


def test_a_complement_weaker_than_a_mirror_is_not_read() -> None:
    """Three textures (45 %, 45 %, 10 %): "metallic" is CLIP's call where "checkered" is absent on most
    images (phi about −0.8), not all. Class 2 relies on the absence of "checkered"; "metallic" for it (z
    about 41) carries less than class 0's mirror (about 44), so the finding stays as it reads."""
    rng = np.random.default_rng(5)
    n = 24000
    labels, texture = rng.integers(0, 4, n), rng.choice(3, n, p=[0.45, 0.45, 0.1])
    pred = labels.copy()
    moved = (labels == 2) & (texture == 0) & (rng.random(n) < 0.6)
    pred[moved] = np.where(rng.random(n) < 0.8, 0, rng.choice([1, 3], n))[moved]
    x = np.stack([texture == 0, texture == 1, rng.random(n) < 0.5], 1)
    behaviour = ProbeBehaviour(x, ["checkered", "metallic", "filler"], pred, labels, np.zeros(3))
    ev = evidence_grid(
        behaviour, 4, np.ones((4, 3, 2), dtype=bool), n_permutations=20, min_effect=0.1, support=_names([0])
    )
    z = ev.figures["z_first"]
    assert z[2, 1, 0] < z[0, 0, 0] < z[2, 0, 1] and ev.agreement(0, 1) < -0.5
    assert np.argwhere(ev.accepted).tolist() == [[0, 0, 0], [2, 0, 1]]


def test_a_proxy_s_reason_says_which_way_clip_calls_it() -> None:
    """The candidates table's reason for a proxy: "follows" for an agreeing call, "does not see" for an
    opposite one (the pair against "small" read as the flag "large")."""
    import pandas as pd

    from tasks.flags import _proxy_reason

    behaviour, eligible = _size_world()
    ev = evidence_grid(behaviour, 4, eligible, n_permutations=20, min_effect=0.1, support=_names([0]))
    rows = pd.DataFrame({"phrase": ["small", "large", "filler"], "proxy_of": [1.0, 0.0, np.nan]})
    assert _proxy_reason(rows, ev).tolist() == [
        "CLIP sees it where it does not see large",
        "CLIP sees it where it does not see small",
        "",
    ]


def test_a_phrase_accepted_on_its_mirror_brings_its_strongest_pair_for_a_class() -> None:
    """As the mirror world, and class 3 also misses 15% of its own images without the cue: the cue's
    pair for class 3 is its strongest (own and other labels add up), its effect weak (under 0.2), and
    the explanations name nothing. In a training-split audit (``named_min_effect``) the pair goes with
    its phrase when the mirror passes; on a held-out probe only the mirror is accepted."""
    labels, cue, filler, pred = _mirror_world()
    rng = np.random.default_rng(4)
    pred[(labels == 3) & ~cue & (rng.random(len(labels)) < 0.15)] = 1
    behaviour = ProbeBehaviour(np.stack([cue, filler], 1), ["cue", "filler"], pred, labels, np.zeros(2))
    eligible = np.ones((4, 2, 2), dtype=bool)
    options = {"n_permutations": 20, "min_effect": 0.2, "support": lambda pairs: np.zeros_like(pairs)}
    held_out = evidence_grid(behaviour, 4, eligible, **options)
    training = evidence_grid(behaviour, 4, eligible, **options, named_min_effect=0.0)
    z, effect = training.figures["z_first"], training.figures["effect_first"]
    assert z[3, 0, 0] > z[0, 0, 1] > training.figures["threshold"][0, 0, 1]
    assert effect[3, 0, 0] < 0.2 <= effect[0, 0, 1]
    assert np.argwhere(held_out.accepted).tolist() == [[0, 0, 1]]
    assert np.argwhere(training.accepted).tolist() == [[0, 0, 1], [3, 0, 0]]
    # The mirror strongest: class 0's cue images go to classes 1, 2 and 3 alike, so no pair for a class
    # is as strong as the one against class 0, and none goes with it.
    labels, cue, filler, pred = _mirror_world()
    moved = (labels == 0) & cue & (rng.random(len(labels)) < 0.33)
    pred = np.where(moved, rng.integers(1, 4, len(labels)), labels)
    behaviour = ProbeBehaviour(np.stack([cue, filler], 1), ["cue", "filler"], pred, labels, np.zeros(2))
    training = evidence_grid(behaviour, 4, eligible, **options, named_min_effect=0.0)
    assert training.figures["z_first"][1:, 0, 0].max() < training.figures["z_first"][0, 0, 1]
    assert np.argwhere(training.accepted).tolist() == [[0, 0, 1]]
