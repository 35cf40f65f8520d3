"""Spurious-correlation flags on runs with planted structure (see tests/auditdata.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from auditdata import OWN, class_text_embeddings, make_run

from tasks.config import MIN_EFFECT, MIN_EFFECT_IN_TRAINING
from tasks.flags import ClassText, _load_scores, flag_spurious, z_lift_matrix
from tasks.store import build_duckdb, query
from textcam.schema import FLAGS

UNDER_EFFECT = f"effect under {MIN_EFFECT:g}"  # the candidates' reason when only the effect fails


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = make_run(tmp_path_factory.mktemp("flags"), write_images=False)
    build_duckdb(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def class_text() -> ClassText:
    return ClassText(class_text_embeddings())


@pytest.fixture(scope="module")
def flags(planted: Path, class_text: ClassText):
    return flag_spurious(planted, class_text)


def test_planted_phrases_are_flagged_first_and_nothing_else(flags) -> None:
    got = {(r.class_name, r.phrase, r.direction, r.rank) for r in flags.itertuples()}
    assert got == {("dog", "snow", "for", 1), ("cat", "stripes", "against", 1)}
    snow = flags[flags["phrase"] == "snow"].iloc[0]
    assert snow["z_lift"] > snow["threshold"]
    assert snow["p_value"] == pytest.approx(1 / 201)  # beyond every permutation's class maximum
    assert snow["n_images"] == 34 and snow["frequency"] == pytest.approx(34 / 40)


def test_for_and_against_are_kept_apart(planted: Path, flags) -> None:
    stripes = query(
        planted, "SELECT direction, z_lift FROM concept_stats WHERE class_name = 'cat' AND phrase = 'stripes'"
    )
    # stripes only ever counts against cat: its "for" row has no selection at all
    assert stripes.set_index("direction").loc["against", "z_lift"] > 5
    assert "for" not in set(flags.loc[flags["phrase"] == "stripes", "direction"])


def test_nothing_is_flagged_without_structure(tmp_path: Path, class_text: ClassText) -> None:
    for seed in (0, 1):
        run_dir = make_run(tmp_path / str(seed), seed=seed, shuffle=True, write_images=False)
        assert flag_spurious(run_dir, class_text).empty


def test_phrases_describing_the_class_are_excluded(planted: Path, class_text: ClassText) -> None:
    # Without text embeddings the class's own phrases dominate the flags ...
    raw = flag_spurious(planted, None)
    own = {(c, p) for c, p in OWN.items()}
    assert own <= set(zip(raw["class_name"], raw["phrase"], strict=True))
    # ... the learned threshold (max similarity between two class names, compared after removing the
    # mean of every unit text embedding) removes exactly those.
    names = ["bird", "cat", "dog"]
    emb = class_text.embeddings
    mean = np.mean([v / np.linalg.norm(v) for v in emb.values()], axis=0)
    centred = {n: emb[n] / np.linalg.norm(emb[n]) - mean for n in names}
    unit = {n: v / np.linalg.norm(v) for n, v in centred.items()}
    expected = max(float(unit[a] @ unit[b]) for a in names for b in names if a != b)
    assert class_text.similarity_threshold(names) == pytest.approx(expected)
    raw = {n: emb[n] / np.linalg.norm(emb[n]) for n in names}
    assert ClassText(emb, centre=False).similarity_threshold(names) == pytest.approx(
        max(float(raw[a] @ raw[b]) for a in names for b in names if a != b)
    )
    sims = class_text.class_similarity("cat", ["whiskers", "snow"])
    assert sims[0] > expected > sims[1]
    kept = flag_spurious(planted, class_text)
    assert not own & set(zip(kept["class_name"], kept["phrase"], strict=True))
    assert (kept["class_similarity"] < kept["similarity_threshold"]).all()


def test_small_filler_phrases_are_not_flagged(tmp_path: Path, class_text: ClassText) -> None:
    # "rope" in 99 % of cat explanations at a fifth of "whiskers": far above its permutation threshold,
    # yet a by-product of fitting the class's direction, not a cue the class is explained by.
    run_dir = make_run(tmp_path, write_images=False, filler=("cat", "rope"))
    build_duckdb(run_dir)
    stats = query(
        run_dir,
        "SELECT z_lift, relative_score FROM concept_stats "
        "WHERE class_name = 'cat' AND phrase = 'rope' AND direction = 'for'",
    ).iloc[0]
    assert 0.1 < stats["relative_score"] < 0.25
    everything = flag_spurious(run_dir, class_text, min_relative_score=0.0)
    rope = everything[everything["phrase"] == "rope"]
    assert len(rope) == 1 and rope.iloc[0]["z_lift"] > rope.iloc[0]["threshold"]
    got = flag_spurious(run_dir, class_text)
    assert "rope" not in set(got["phrase"])
    assert {("dog", "snow"), ("cat", "stripes")} <= set(zip(got["class_name"], got["phrase"], strict=True))


def test_phrases_naming_another_class_are_not_flagged(tmp_path: Path, class_text: ClassText) -> None:
    # "sparrow" as strong evidence against "dog": the classes competing (sparrow is CLIP-close to the
    # class "bird"), not a cue outside the label space.
    run_dir = make_run(tmp_path, write_images=False, confusion=("dog", "sparrow"))
    raw = flag_spurious(run_dir, None)
    assert ("dog", "sparrow", "against") in set(
        zip(raw["class_name"], raw["phrase"], raw["direction"], strict=True)
    )
    bird = class_text.embeddings["bird"]
    noise = np.random.default_rng(0).normal(size=bird.shape)
    sparrow = bird / np.linalg.norm(bird) + 0.3 * noise / np.linalg.norm(noise)
    ct = ClassText({**class_text.embeddings, "sparrow": sparrow})
    got = flag_spurious(run_dir, ct)
    assert "sparrow" not in set(got["phrase"])
    assert ("dog", "snow") in set(zip(got["class_name"], got["phrase"], strict=True))


def test_min_relative_score_is_checked(planted: Path) -> None:
    with pytest.raises(ValueError, match="min_relative_score"):
        flag_spurious(planted, None, min_relative_score=1.5)


def test_own_vocabulary_is_excluded_by_text(planted: Path) -> None:
    # Embeddings that know nothing about "snow" still exclude it once it is dog's own vocabulary.
    ct = ClassText({"bird": np.eye(3)[0], "cat": np.eye(3)[1], "dog": np.eye(3)[2]}, {"dog": ["Snow"]})
    got = flag_spurious(planted, ct)
    assert ("dog", "snow") not in set(zip(got["class_name"], got["phrase"], strict=True))


def test_numpy_statistic_matches_sql(planted: Path) -> None:
    import duckdb

    con = duckdb.connect(str(planted / "run.duckdb"), read_only=True)
    con.execute(f"SET file_search_path = '{planted}'")
    images, cols, trip = _load_scores(con)
    con.close()
    k, q = len(images["class_name"].unique()), len(cols)
    sums = np.bincount(
        images["k"].to_numpy()[trip["i"]] * q + trip["q"].to_numpy(), weights=trip["score"], minlength=k * q
    ).reshape(1, k, q)
    n = len(images)
    total = np.bincount(trip["q"], weights=trip["score"], minlength=q)
    sd = np.sqrt(np.bincount(trip["q"], weights=trip["score"] ** 2, minlength=q) / n - (total / n) ** 2)
    z = z_lift_matrix(
        sums, np.bincount(images["k"]), total, sd, (cols["direction"] == "against").to_numpy(int)
    )[0]
    sql = query(planted, "SELECT class_name, phrase, direction, z_lift FROM concept_stats")
    classes = sorted(images["class_name"].unique())
    qi = {(p, d): i for p, d, i in cols[["phrase", "direction"]].assign(i=cols["q"]).itertuples(index=False)}
    ours = [
        z[classes.index(c), qi[(p, d)]]
        for c, p, d in sql[["class_name", "phrase", "direction"]].itertuples(index=False)
    ]
    np.testing.assert_allclose(ours, sql["z_lift"].astype(float), rtol=1e-9, atol=1e-9)


def test_misclassified_enrichment_is_the_smoothed_ratio(planted: Path, flags) -> None:
    snow = flags[flags["phrase"] == "snow"].iloc[0]
    truth = query(
        planted,
        """
        WITH p AS (
            SELECT misclassified AS mis, len(list_filter(phrases, lambda x: x.text = 'snow')) > 0 AS snow
            FROM predictions WHERE class_name = 'dog'
        )
        SELECT count(*) FILTER (WHERE mis) AS n_mis, count(*) FILTER (WHERE mis AND snow) AS k_mis,
               count(*) FILTER (WHERE NOT mis) AS n_cor, count(*) FILTER (WHERE NOT mis AND snow) AS k_cor
        FROM p
        """,
    ).iloc[0]
    expected = (truth.k_mis + 0.5) / (truth.n_mis + 1) / ((truth.k_cor + 0.5) / (truth.n_cor + 1))
    assert snow["misclassified_enrichment"] == pytest.approx(expected)
    assert snow["n_misclassified"] == truth.n_mis
    assert snow["misclassified_enrichment"] > 1  # snow is over-represented among the mistakes


def test_flags_are_written_with_the_declared_schema(planted: Path, class_text: ClassText) -> None:
    flags = flag_spurious(planted, class_text)  # other tests rewrite the shared run's flags
    table = pq.read_table(planted / "flags.parquet")
    assert table.schema.equals(FLAGS, check_metadata=False)
    assert table.num_rows == len(flags)
    db = query(planted, "SELECT class_name, phrase, example_image_ids FROM flags ORDER BY class_name")
    assert db["phrase"].tolist() == ["stripes", "snow"]
    # examples: the top-scoring images of the class for that phrase, best first
    ex = list(db["example_image_ids"][1])
    scores = query(
        planted,
        "SELECT image_id, score FROM image_phrases WHERE class_name = 'dog' AND phrase = 'snow' "
        "ORDER BY score DESC, image_id LIMIT 6",
    )
    assert ex == scores["image_id"].tolist()


def test_build_duckdb_reloads_flags(planted: Path, class_text: ClassText) -> None:
    flags = flag_spurious(planted, class_text)
    build_duckdb(planted)
    assert query(planted, "SELECT count(*) AS n FROM flags")["n"][0] == len(flags)


def test_bad_arguments_are_rejected(planted: Path) -> None:
    with pytest.raises(ValueError, match="quantile"):
        flag_spurious(planted, None, quantile=1.0)
    with pytest.raises(ValueError, match="n_permutations"):
        flag_spurious(planted, None, n_permutations=0)


def _seen(planted: Path, z: dict[tuple[str, str], float | None]) -> pd.DataFrame:
    """A co-occurrence table giving ``data_z`` to (class, phrase); every other pair 0 (not visible)."""
    stats = query(planted, "SELECT DISTINCT class_name, class_index, phrase FROM concept_stats")
    data_z = [z.get((c, p), 0.0) for c, p in zip(stats["class_name"], stats["phrase"], strict=True)]
    return stats.drop(columns="class_name").assign(
        n_probe_class=50, data_lift=np.array(data_z, dtype=float) / 5, data_z=data_z, data_threshold=3.0
    )


def test_flags_need_the_phrase_in_the_images(planted: Path, class_text: ClassText, flags) -> None:
    def got(seen: pd.DataFrame) -> set[tuple[str, str, str]]:
        out = flag_spurious(planted, class_text, seen)
        return set(zip(out["class_name"], out["phrase"], out["direction"], strict=True))

    both = {("dog", "snow", "for"), ("cat", "stripes", "against")}
    # visible in the class's probe images, in the flag's direction: flagged as without the check
    visible = got(_seen(planted, {("dog", "snow"): 9.0, ("cat", "stripes"): -9.0}))
    assert visible == both
    # snow no more frequent among dog images than elsewhere; stripes *more* frequent among cats
    # although it counts against cat: neither is a correlation in the data
    assert got(_seen(planted, {("dog", "snow"): 2.9, ("cat", "stripes"): 9.0})) == set()
    # unknown (too few probe images of the class): the explanations decide alone
    unknown = got(_seen(planted, {("dog", "snow"): None, ("cat", "stripes"): -9.0}))
    assert unknown == both
    out = flag_spurious(planted, class_text, _seen(planted, {("dog", "snow"): 9.0, ("cat", "stripes"): -9.0}))
    snow = out[out["phrase"] == "snow"].iloc[0]
    assert (snow["data_z"], snow["data_threshold"], snow["n_probe_class"]) == (9.0, 3.0, 50)
    assert flags["data_z"].isna().all()  # no co-occurrence given


def test_cooccurrence_needs_its_columns(planted: Path, class_text: ClassText) -> None:
    with pytest.raises(ValueError, match="lacks columns"):
        flag_spurious(planted, class_text, pd.DataFrame({"class_index": [0], "phrase": ["snow"]}))


def _probe(
    phrases: list[str],
    used: float,
    n: int = 900,
    seed: int = 0,
    right: float = 0.9,
    with_dog: float = 0.0,
):
    """A probe where CLIP sees each phrase in a random half of the images and the model is right on a
    share ``right`` of them; it predicts dog (index 2) on a share ``used`` of the images where it sees
    "snow", whatever the true class. ``with_dog``: the share of the other dog images that show snow too
    (snow goes with dog in these images: 0.5 + with_dog/2 of them against half of the others)."""
    from tasks.behaviour import ProbeBehaviour

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    presence = rng.random((n, len(phrases))) < 0.5
    pred = np.where(rng.random(n) < right, labels, rng.integers(0, 3, n))  # a model that errs now and then
    takes = rng.random(n) < used
    snow = phrases.index("snow")
    presence[:, snow] |= (labels == 2) & (rng.random(n) < with_dog)  # drawn last: nothing else changes
    pred[presence[:, snow] & takes] = 2
    return ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))


def test_model_evidence_decides_with_a_probe(planted: Path, class_text: ClassText) -> None:
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    used = flag_spurious(planted, class_text, behaviour=_probe(phrases, used=1.0))
    dog = used[used["class_name"] == "dog"]
    assert next((r.phrase, r.direction, r.rank) for r in dog.itertuples()) == ("snow", "for", 1)
    top = dog.iloc[0]
    assert top["effect"] > 0.9 and top["z_model"] > top["model_threshold"] and top["step"] == 1
    # The same explanations, but the model does not act on snow: the explanations' lift alone flags nothing.
    unused = flag_spurious(planted, class_text, behaviour=_probe(phrases, used=0.0))
    assert unused.empty
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas()
    snow = why[(why["class_name"] == "dog") & (why["phrase"] == "snow") & (why["direction"] == "for")].iloc[0]
    assert not snow["flagged"] and snow["reason"] in (
        "model evidence under the permutation null",
        UNDER_EFFECT,
    )
    assert abs(snow["z_model"]) < snow["model_threshold"]
    own = why[why["phrase"] == "whiskers"]
    assert (own["reason"] == "names a class of the task").all()
    assert query(planted, "SELECT count(*) AS n FROM flag_candidates")["n"][0] == len(why)


def test_a_probe_seen_in_training_lets_a_named_weak_cue_pass(planted: Path, class_text: ClassText) -> None:
    """A model right on 97 % of its own images leans on "snow" only a little in-sample (effect about
    0.1): flagged for dog, whose explanations name it, only when the probe is said to be training data."""
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    behaviour = _probe(phrases, used=0.12, n=6000, seed=5, right=0.97, with_dog=0.5)
    held_out = flag_spurious(planted, class_text, behaviour=behaviour)
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas()
    snow = why[(why["class_name"] == "dog") & (why["phrase"] == "snow") & (why["direction"] == "for")].iloc[0]
    assert held_out.empty and snow["reason"] == UNDER_EFFECT
    assert snow["z_model"] > snow["model_threshold"] and 0.05 < snow["effect"] < 0.2
    trained = flag_spurious(planted, class_text, behaviour=behaviour, probe_seen_in_training=True)
    assert list(zip(trained["class_name"], trained["phrase"], trained["direction"], strict=True)) == [
        ("dog", "snow", "for")
    ]
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    assert why.loc[("cat", "snow"), "direction"] == "against"  # never relaxed: the plain reason
    assert why.loc[("cat", "snow"), "reason"] == f"effect under {MIN_EFFECT_IN_TRAINING:g}"


def test_training_images_have_their_own_effect_bound(planted: Path, class_text: ClassText) -> None:
    """Snow takes a quarter of the other classes' images to dog (effect about 0.25): under the held-out
    bound (0.3), over the training-split one (0.2), so it is flagged only when the probe is training data
    (where snow goes with dog)."""
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    behaviour = _probe(phrases, used=0.25, n=6000, seed=6, right=1.0, with_dog=0.8)
    assert flag_spurious(planted, class_text, behaviour=behaviour).empty
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    assert why.loc[("dog", "snow"), "reason"] == UNDER_EFFECT
    assert MIN_EFFECT_IN_TRAINING < why.loc[("dog", "snow"), "effect"] < MIN_EFFECT
    trained = flag_spurious(planted, class_text, behaviour=behaviour, probe_seen_in_training=True)
    # ...for dog, and against the classes whose snowy images it takes (the same shortcut, mirrored)
    assert set(zip(trained["class_name"], trained["phrase"], trained["direction"], strict=True)) == {
        ("dog", "snow", "for"),
        ("bird", "snow", "against"),
        ("cat", "snow", "against"),
    }
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    assert why.loc[("dog", "snow"), "min_effect"] == MIN_EFFECT_IN_TRAINING


def test_a_cue_needs_its_class_in_the_training_data(planted: Path, class_text: ClassText) -> None:
    """The model takes every snowy image for a dog. Where snow goes with dog in the training data it is a
    shortcut and flagged; where it goes with no class there (a trait the model handles unevenly, not a
    correlation it learned) it is not, and the near misses say why with the value seen."""
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    behaviour = _probe(phrases, used=1.0)
    correlation = np.zeros((3, len(phrases)))
    none = flag_spurious(planted, class_text, behaviour=behaviour, correlation=correlation)
    assert none.empty
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    snow = why.loc[("dog", "snow")]
    assert not snow["flagged"] and snow["data_correlation"] == 0.0 and snow["effect"] > 0.9
    assert snow["reason"].startswith(
        "the model acts on it, but it does not go with the class in the training"
    )
    assert "+0.00 against the other classes, under 0.1" in snow["reason"]
    # snow in 70 % of the dogs' training images, 40 % of the others': dog for snow, and cat and bird
    # against it (-0.3 in their direction: snow goes *against* them in the data too)
    correlation[:, phrases.index("snow")] = [-0.3, -0.3, 0.3]
    flagged = flag_spurious(planted, class_text, behaviour=behaviour, correlation=correlation)
    dog = flagged[flagged["class_name"] == "dog"].iloc[0]
    assert (dog["phrase"], dog["direction"], dog["data_correlation"]) == ("snow", "for", 0.3)
    against = flagged[flagged["direction"] == "against"]
    assert set(against["class_name"]) == {"bird", "cat"} and (against["data_correlation"] == 0.3).all()
    with pytest.raises(ValueError, match="expected \\(classes, "):
        flag_spurious(planted, class_text, behaviour=behaviour, correlation=correlation[:, 1:])


def test_a_training_probe_is_its_own_data_check(planted: Path, class_text: ClassText) -> None:
    """A probe seen in training carries the data: snow in half of every class's images goes with none."""
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    unrelated = _probe(phrases, used=0.25, n=6000, seed=6, right=1.0)
    assert flag_spurious(planted, class_text, behaviour=unrelated, probe_seen_in_training=True).empty
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    assert abs(why.loc[("dog", "snow"), "data_correlation"]) < 0.05
    assert why.loc[("dog", "snow"), "reason"].startswith("the model acts on it, but it does not go with")
    # held out, with no training data given, there is no data check (and the effect is under 0.3)
    assert flag_spurious(planted, class_text, behaviour=unrelated).empty
    why = pq.read_table(planted / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    assert np.isnan(why.loc[("dog", "snow"), "data_correlation"])


def test_a_cue_the_explanations_never_name_is_flagged_without_examples(
    planted: Path, class_text: ClassText
) -> None:
    """No dog explanation counts "stripes" against dog, but the model never calls an image with stripes
    a dog: flagged from what the model does, with no example images."""
    from tasks.behaviour import ProbeBehaviour

    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 900)
    presence = rng.random((900, len(phrases))) < 0.5
    pred = np.where(rng.random(900) < 0.9, labels, rng.integers(0, 3, 900))
    stripes = presence[:, phrases.index("stripes")]
    pred[stripes & (pred == 2)] = 0
    behaviour = ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))
    got = flag_spurious(planted, class_text, behaviour=behaviour)
    cue = got[(got["phrase"] == "stripes") & (got["class_name"] == "dog")]
    assert len(cue) == 1 and cue.iloc[0]["direction"] == "against"
    assert list(cue.iloc[0]["example_image_ids"]) == [] and cue.iloc[0]["frequency"] == 0.0


def test_a_cue_no_explanation_selected_is_tested_and_flagged(
    planted: Path, class_text: ClassText, tmp_path: Path
) -> None:
    """ "lava" is in the probe's vocabulary but in no explanation of the run: the model test still covers
    it (the model calls every lava image a dog), the flag says the explanations never selected it, and
    the report renders it."""
    import shutil

    from reports import render_report
    from tasks.behaviour import ProbeBehaviour

    run_dir = tmp_path / "run"
    shutil.copytree(planted, run_dir)
    phrases = query(run_dir, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    assert "lava" not in phrases
    phrases = [*phrases, "lava"]
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, 900)
    presence = rng.random((900, len(phrases))) < 0.5
    pred = np.where(rng.random(900) < 0.9, labels, rng.integers(0, 3, 900))
    pred[presence[:, -1]] = 2  # "dog" is class 2 of the planted run
    got = flag_spurious(
        run_dir, class_text, behaviour=ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))
    )
    lava = got[(got["phrase"] == "lava") & (got["direction"] == "for")]
    assert lava["class_name"].tolist() == ["dog"]
    row = lava.iloc[0]
    assert row["n_images"] == 0 and row["frequency"] == 0.0 and pd.isna(row["z_lift"])
    assert row["effect"] > 0.5 and list(row["example_image_ids"]) == []
    why = pq.read_table(run_dir / "flag_candidates.parquet").to_pandas()
    assert why[(why["phrase"] == "lava") & (why["class_name"] == "dog")]["flagged"].any()
    assert Path(render_report(run_dir)).read_text().count("lava") >= 1


def test_what_the_explanations_name_is_accepted_before_a_closer_proxy(
    planted: Path, class_text: ClassText, tmp_path: Path
) -> None:
    """The model predicts dog wherever a cue is; CLIP calls "snow" (which the dog explanations name) on
    70 % of those images and "lava" (which no explanation selected) on all of them. The model test alone
    prefers lava; the flag names snow, and lava, seen where snow is, is its proxy."""
    import shutil

    from tasks.behaviour import ProbeBehaviour

    run_dir = tmp_path / "run"
    shutil.copytree(planted, run_dir)
    phrases = [*query(run_dir, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"], "lava"]
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 3, 900)
    presence = rng.random((900, len(phrases))) < 0.5
    cue = presence[:, -1]  # lava: exactly where the cue is
    presence[:, phrases.index("snow")] = cue & (rng.random(900) < 0.7)
    pred = np.where(rng.random(900) < 0.9, labels, rng.integers(0, 3, 900))
    pred[cue] = 2
    got = flag_spurious(
        run_dir, class_text, behaviour=ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))
    )
    dog = got[(got["class_name"] == "dog") & (got["direction"] == "for")].set_index("phrase")
    assert dog.index[0] == "snow" and dog.loc["snow", "rank"] == 1 and dog.loc["snow", "step"] == 1
    assert "lava" not in dog.index
    assert list(dog.loc["snow", "aliases"]) == ["lava"]  # the same concept, to this CLIP, by another name
    from reports import render_report

    assert "Also read as: lava" in Path(render_report(run_dir)).read_text()
    why = pq.read_table(run_dir / "flag_candidates.parquet").to_pandas().set_index(["class_name", "phrase"])
    first = why[why["direction"] == "for"]
    assert first.loc[("dog", "lava"), "z_first"] > first.loc[("dog", "snow"), "z_first"]  # by z, lava first
    assert first.loc[("dog", "lava"), "reason"].startswith("a proxy of an earlier flag")
    assert first.loc[("dog", "lava"), "reason"].endswith("snow")


def test_text_closeness_to_a_class_needs_the_images_to_agree(planted: Path) -> None:
    """A weak text encoder puts "snow" as close to "dog" as a class name: excluded by text alone, but not
    when the probe shows CLIP sees snow independently of where it sees a dog; excluded again when the
    two are seen in the same images."""
    from dataclasses import replace

    emb = dict(class_text_embeddings())
    rng = np.random.default_rng(3)
    emb["snow"] = emb["dog"] + 0.01 * rng.standard_normal(emb["dog"].shape)
    text = ClassText(emb)
    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    probe = _probe(phrases, used=1.0)

    def snow_for_dog(behaviour) -> tuple[bool, str, float]:
        flag_spurious(planted, text, behaviour=behaviour)
        why = pq.read_table(planted / "flag_candidates.parquet").to_pandas()
        row = why[(why["class_name"] == "dog") & (why["phrase"] == "snow") & (why["direction"] == "for")]
        return bool(row["flagged"].iloc[0]), str(row["reason"].iloc[0]), float(row["class_agreement"].iloc[0])

    flagged, reason, agreement = snow_for_dog(probe)  # no class presence: the text decides
    assert (flagged, reason) == (False, "names a class of the task") and np.isnan(agreement)
    independent = rng.random((len(probe.predictions), 3)) < 0.5
    flagged, reason, agreement = snow_for_dog(replace(probe, class_presence=independent))
    assert flagged and reason == "flagged" and abs(agreement) < 0.2
    same = independent.copy()
    same[:, 2] = probe.presence[:, phrases.index("snow")]
    flagged, reason, agreement = snow_for_dog(replace(probe, class_presence=same))
    assert (flagged, reason, agreement) == (False, "names a class of the task", pytest.approx(1.0))


def test_phi_matches_numpy_correlation() -> None:
    from tasks.behaviour import phi

    rng = np.random.default_rng(0)
    a = rng.random((200, 3)) < 0.4
    b = np.c_[a[:, 0], ~a[:, 1], rng.random(200) < 0.5, np.ones(200, dtype=bool)]
    got = phi(a, b)
    want = np.corrcoef(np.c_[a, b[:, :3]].T.astype(float))[:3, 3:]
    np.testing.assert_allclose(got[:, :3], want, atol=1e-12)
    assert (got[:, 3] == 0).all()  # a constant column correlates with nothing


def test_null_and_p_values_do_not_depend_on_the_chunk_size(planted: Path, flags) -> None:
    """The permutation null is the same however many permutations a chunk holds, and each flag's p-value
    is (1 + #maxima >= z) / (1 + permutations) against its class's maxima."""
    import duckdb

    from tasks.flags import permutation_null

    con = duckdb.connect(str(planted / "run.duckdb"), read_only=True)
    con.execute(f"SET file_search_path = '{planted}'")
    images, cols, trip = _load_scores(con)
    con.close()
    args = (
        images["k"].to_numpy(np.int64),
        trip["i"].to_numpy(np.int64),
        trip["q"].to_numpy(np.int64),
        trip["score"].to_numpy(np.float64),
        len(cols),
        (cols["direction"] == "against").to_numpy(np.int64),
    )
    one = permutation_null(*args, n_permutations=40, max_cells=1)  # one permutation per chunk
    many = permutation_null(*args, n_permutations=40)
    np.testing.assert_array_equal(one, many)
    full = permutation_null(*args, n_permutations=200)
    classes = sorted(images["class_name"].unique())
    for f in flags.itertuples():
        null = full[:, classes.index(f.class_name)]
        assert f.p_value == pytest.approx((1 + (null >= f.z_lift).sum()) / 201)


def test_class_similarities_match_one_class_at_a_time() -> None:
    """The batched (K, P) similarities equal a plain per-class computation, unknown texts NaN."""
    rng = np.random.default_rng(3)
    texts = ["cat", "dog", "kitten", "puppy", "grass", "sand", "water"]
    text = ClassText(
        embeddings={t: rng.standard_normal(8) for t in texts},
        own_vocabulary={"cat": ["kitten"], "dog": ["puppy", "dog"]},
    )
    classes, phrases = ["cat", "dog", "bird"], ["grass", "sand", "unknown", "water"]
    got = text.class_similarities(classes, phrases)

    def unit(v: np.ndarray) -> np.ndarray:
        return v / np.linalg.norm(v)

    mean = np.mean([unit(text.embeddings[t]) for t in texts], axis=0)
    for k, c in enumerate(classes):
        refs = [t for t in [c, *text.own_vocabulary.get(c, [])] if t in text.embeddings]
        for j, p in enumerate(phrases):
            if not refs or p not in text.embeddings:
                assert np.isnan(got[k, j])
                continue
            want = max(
                unit(unit(text.embeddings[p]) - mean) @ unit(unit(text.embeddings[r]) - mean) for r in refs
            )
            assert got[k, j] == pytest.approx(want, abs=1e-12)


def test_the_null_on_a_stratified_sample_agrees_with_the_full_null(tmp_path: Path, class_text) -> None:
    """Above ``null_images`` the explanations' null uses a class-stratified, hash-chosen sample: every
    class keeps about its share (and about NULL_FLOOR images at least), the sample is the same on every
    call, and the thresholds and flags agree with the full null."""
    import duckdb

    from tasks.flags import NULL_FLOOR

    n = 3 * NULL_FLOOR
    run_dir = make_run(tmp_path, n_per_class=n, write_images=False)
    build_duckdb(run_dir)
    con = duckdb.connect(str(run_dir / "run.duckdb"), read_only=True)
    con.execute(f"SET file_search_path = '{run_dir}'")
    images, _, trip = _load_scores(con, 3 * NULL_FLOOR)
    again, _, _ = _load_scores(con, 3 * NULL_FLOOR)
    floor, _, _ = _load_scores(con, 300)
    full, _, full_trip = _load_scores(con)
    con.close()
    assert len(full) == 3 * n
    kept = images["class_name"].value_counts()  # each class about its share, 1000 of 3000
    assert len(kept) == 3 and kept.between(0.9 * NULL_FLOOR, 1.1 * NULL_FLOOR).all()
    assert floor["class_name"].value_counts().between(0.9 * NULL_FLOOR, 1.1 * NULL_FLOOR).all()  # the floor
    assert images["image_id"].tolist() == again["image_id"].tolist()
    assert set(trip["i"]) == set(range(len(images))) and len(trip) < len(full_trip)
    # The 0.99 quantile of 200 maxima moves by ~0.3 between permutation seeds; averaged over three seeds
    # the sample must stay within that (a sample of 100 images a class raised it by ~0.5).
    key = ["class_name", "phrase", "direction"]
    thresholds, flags = {}, {}
    for null in (3 * NULL_FLOOR, None):
        runs = [flag_spurious(run_dir, class_text, null_images=null, seed=seed) for seed in range(3)]
        flags[null] = runs[0][key]
        assert all(r[key].equals(flags[null]) for r in runs)
        thresholds[null] = np.mean([r.groupby("class_name")["threshold"].first().mean() for r in runs])
    assert flags[3 * NULL_FLOOR].equals(flags[None])
    assert abs(thresholds[3 * NULL_FLOOR] - thresholds[None]) < 0.25


def test_phi_within_strata_is_the_pooled_within_stratum_correlation() -> None:
    """Two columns that agree only because both follow the stratum (a cue on biased data) have a plain
    phi near 1 and a within-strata phi near 0; columns that agree inside the strata keep it."""
    from tasks.behaviour import phi

    rng = np.random.default_rng(0)
    strata = rng.integers(0, 3, 3000)
    a = (strata == 1) ^ (rng.random(3000) < 0.05)
    follows_strata = (strata == 1) ^ (rng.random(3000) < 0.05)
    b = np.c_[follows_strata, a]
    plain, within = phi(a[:, None], b), phi(a[:, None], b, strata)
    assert plain[0, 0] > 0.7 and abs(within[0, 0]) < 0.1
    assert within[0, 1] == pytest.approx(1.0)
    centred = [
        np.concatenate([c[strata == s] - c[strata == s].mean() for s in range(3)]) for c in (a, b[:, 0])
    ]
    want = (centred[0] @ centred[1]) / np.sqrt((centred[0] @ centred[0]) * (centred[1] @ centred[1]))
    assert within[0, 0] == pytest.approx(want, abs=1e-12)


def test_a_named_weak_pair_ranks_after_its_class_s_own_cue(planted: Path, class_text: ClassText) -> None:
    """A training probe: snowy cats are taken for birds (snow's mirror against cat, strong), snowy images
    go to dog a little (weak; dog's explanations name snow), and balls go to dog strongly. Snow is
    accepted first, its weak dog pair with it; dog's own strong cue, ball, still ranks first for dog."""
    from tasks.behaviour import ProbeBehaviour

    phrases = query(planted, "SELECT DISTINCT phrase FROM concept_stats ORDER BY 1")["phrase"].tolist()
    rng = np.random.default_rng(7)
    n = 9000
    labels = rng.integers(0, 3, n)  # bird, cat, dog
    presence = rng.random((n, len(phrases))) < 0.5
    snow, ball = phrases.index("snow"), phrases.index("ball")
    for column in (snow, ball):
        presence[:, column] |= (labels == 2) & (rng.random(n) < 0.6)  # both go with dog in the data
    pred = labels.copy()
    pred[(labels == 1) & presence[:, snow] & (rng.random(n) < 0.95)] = 0
    pred[(labels != 2) & presence[:, snow] & (rng.random(n) < 0.08)] = 2
    pred[(labels != 2) & presence[:, ball] & (rng.random(n) < 0.24)] = 2
    behaviour = ProbeBehaviour(presence, phrases, pred, labels, np.zeros(len(phrases)))
    out = flag_spurious(planted, class_text, behaviour=behaviour, probe_seen_in_training=True)
    dog = out[out["class_name"] == "dog"].set_index("phrase")
    assert dog.loc["snow", "step"] < dog.loc["ball", "step"]  # snow went first, for its mirror
    assert dog.loc["snow", "effect"] < MIN_EFFECT_IN_TRAINING <= dog.loc["ball", "effect"]
    assert (dog.loc["ball", "rank"], dog.loc["snow", "rank"]) == (1, 2)
