"""``edu-synth``: a built-in, fully **synthetic** multi-modal education federation.

Nothing here is real student data. It is generated from the seed so that a run needs no
network and no set-up, while having the structure real federations have:

* tiers ``global -> institution -> student``;
* three modalities: ``tabular`` (12 learning-activity features), ``image`` (8x8
  handwriting-like digit scans, seven-segment glyphs with jitter and noise) and ``text``
  (short essays as token ids; vocabulary of 96, 0 is padding);
* four tasks: ``dropout_risk`` (tabular, 2 classes), ``digit`` (image, 10 classes: reading a
  handwritten answer), ``essay_topic`` (text, 4 classes) and ``essay_grade`` (text + tabular,
  3 classes — needs both: the essay carries writing ability, the activity log engagement);
* non-IID: each institution draws its own class mix (Dirichlet ``label_skew``), its own
  offset in dropout risk, and its students' sizes (lognormal ``size_skew``); some students
  have no scanner (no image modality), and ``essay_only_institutions`` institutions only
  grade essays (tabular + text, essay tasks only).

Deeper trees (``data.options``): ``regions: R`` puts institution ``i`` in region ``i % R``
(tier ``region`` between global and institution) and ``courses_per_institution: C`` puts
student ``s`` in course ``s % C`` of its institution (tier ``course`` between institution and
student), e.g. ``student -> course -> institution -> region -> global``. The rows are the same
as in the flat tree (keyed by the flat student id): only the grouping changes.
``resource_mix: {light: 0.25, full: 0.75}`` gives students resource classes (exact quotas).

Group column ``access`` on every row (for per-group, equity metrics; never an input):
``scanner`` for students who have the image modality, ``no_scanner`` for those who do not
(the essay-only institutions' students included). It is derived from the draws above, so
it changes no row.
"""

from __future__ import annotations

import numpy as np

from hierfed.config import DataConfig
from hierfed.data.federation import (
    ClientData,
    ClientProfile,
    Federation,
    ModalitySpec,
    TaskSpec,
    subset,
)
from hierfed.data.partition import assign_resources
from hierfed.errors import ConfigError, DataError
from hierfed.registry import DATASETS
from hierfed.seeding import np_rng

N_FEATURES = 12
IMG = 8
TEXT_LEN = 16
VOCAB = 96
TOPICS = 4
# token blocks: 1..31 common words, 32..63 topic words (8 per topic), 64..95 advanced words
COMMON = np.arange(1, 32)
TOPIC_WORDS = [np.arange(32 + 8 * k, 40 + 8 * k) for k in range(TOPICS)]
ADVANCED = np.arange(64, 96)

# seven-segment layout on an 8x8 canvas: (row slice, col slice) per segment a..g
_SEGMENTS = {
    "a": (slice(0, 1), slice(2, 6)),
    "b": (slice(1, 4), slice(6, 7)),
    "c": (slice(4, 7), slice(6, 7)),
    "d": (slice(7, 8), slice(2, 6)),
    "e": (slice(4, 7), slice(1, 2)),
    "f": (slice(1, 4), slice(1, 2)),
    "g": (slice(3, 5), slice(2, 6)),
}
_DIGITS = ["abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg"]


def _glyphs() -> np.ndarray:
    out = np.zeros((10, IMG, IMG), dtype=np.float32)
    for k, segs in enumerate(_DIGITS):
        for s in segs:
            r, c = _SEGMENTS[s]
            out[k, r, c] = 1.0
    return out


TASKS = {
    "dropout_risk": TaskSpec(
        "dropout_risk", ("tabular",), 2, description="will the student drop out (activity log)"
    ),
    "digit": TaskSpec("digit", ("image",), 10, description="read a handwritten answer digit"),
    "essay_topic": TaskSpec(
        "essay_topic", ("text",), TOPICS, description="subject of a short essay"
    ),
    "essay_grade": TaskSpec(
        "essay_grade",
        ("text", "tabular"),
        3,
        description="grade band of an essay (needs essay + activity)",
    ),
}
MODALITIES = {
    "tabular": ModalitySpec("tabular", "tabular", (N_FEATURES,)),
    "image": ModalitySpec("image", "image", (1, IMG, IMG)),
    "text": ModalitySpec("text", "text", (TEXT_LEN,), vocab_size=VOCAB),
}


def _mixing_matrix(seed: int) -> np.ndarray:
    rng = np_rng(seed, "edu-synth", "features")
    return rng.normal(0, 1, (N_FEATURES, 4)).astype(np.float32)


def generate(
    n: int,
    rng: np.random.Generator,
    *,
    digit_prior: np.ndarray,
    topic_prior: np.ndarray,
    risk_offset: float,
    mix: np.ndarray,
) -> ClientData:
    """``n`` rows with every modality and every task label."""
    engagement = rng.normal(0, 1, n)
    ability = rng.normal(0, 1, n)
    z = np.stack([engagement, ability * 0.3, rng.normal(0, 1, n), rng.normal(0, 1, n)], axis=1)
    tab = (z @ mix.T + rng.normal(0, 0.3, (n, N_FEATURES))).astype(np.float32)
    risk = (-1.5 * engagement - 0.5 * ability + risk_offset + rng.normal(0, 0.5, n)) > 0

    digits = rng.choice(10, size=n, p=digit_prior)
    glyph = _glyphs()[digits]
    shifts = rng.integers(-1, 2, size=(n, 2))
    img = (
        np.stack([np.roll(np.roll(g, s[0], axis=0), s[1], axis=1) for g, s in zip(glyph, shifts)])
        if n
        else glyph
    )
    img = img * rng.uniform(0.7, 1.2, (n, 1, 1)) + rng.normal(0, 0.25, (n, IMG, IMG))
    img = img[:, None].astype(np.float32)

    topics = rng.choice(TOPICS, size=n, p=topic_prior)
    adv_rate = 1 / (1 + np.exp(-1.5 * ability))  # abler writers use more advanced words
    text = np.zeros((n, TEXT_LEN), dtype=np.int64)
    lengths = rng.integers(10, TEXT_LEN + 1, size=n)
    for i in range(n):
        L = lengths[i]
        kind = rng.random(L)
        words = rng.choice(COMMON, size=L)
        topical = kind < 0.35
        words[topical] = rng.choice(TOPIC_WORDS[topics[i]], size=int(topical.sum()))
        adv = (kind >= 0.35) & (kind < 0.35 + 0.4 * adv_rate[i])
        words[adv] = rng.choice(ADVANCED, size=int(adv.sum()))
        text[i, :L] = words
    quality = 1.0 * ability + 1.0 * engagement + rng.normal(0, 0.4, n)
    grade = np.digitize(quality, [-0.8, 0.8])

    return ClientData(
        {"tabular": tab, "image": img, "text": text},
        {
            "dropout_risk": risk.astype(np.int64),
            "digit": digits.astype(np.int64),
            "essay_topic": topics.astype(np.int64),
            "essay_grade": grade.astype(np.int64),
        },
    )


OPTIONS: dict[str, object] = {"regions": 0, "courses_per_institution": 0, "resource_mix": {}}


def tree_options(cfg: DataConfig) -> tuple[int, int]:
    """(regions, courses per institution) from ``data.options``; 0 = no such tier."""
    unknown = sorted(set(cfg.options) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"data.options.{unknown[0]}",
            cfg.options[unknown[0]],
            f"edu-synth takes options {sorted(OPTIONS)}",
        )
    opts = {**OPTIONS, **dict(cfg.options)}
    for k, v in opts.items():
        if k == "resource_mix":
            continue
        if not isinstance(v, int) or v < 0:
            raise ConfigError(f"data.options.{k}", v, "an integer >= 0 (0 = no such tier)")
    regions, courses = int(opts["regions"]), int(opts["courses_per_institution"])  # type: ignore[call-overload]
    if regions > cfg.num_institutions:
        raise DataError(
            f"data.options.regions={regions} > data.num_institutions={cfg.num_institutions} would leave "
            "a region with no institution; lower regions or add institutions"
        )
    if courses > cfg.students_per_institution:
        raise DataError(
            f"data.options.courses_per_institution={courses} > data.students_per_institution="
            f"{cfg.students_per_institution} would leave a course with no student; lower it or add students"
        )
    return regions, courses


@DATASETS.register("edu-synth")
def build_edu_synth(cfg: DataConfig, seed: int) -> Federation:
    """Generate the federation; same ``(cfg, seed)`` gives the same arrays, bit for bit."""
    mix = _mixing_matrix(seed)
    clients: list[ClientProfile] = []
    train: dict[str, ClientData] = {}
    test: dict[str, ClientData] = {}
    n_inst = cfg.num_institutions
    essay_only = set(range(n_inst - cfg.essay_only_institutions, n_inst))
    regions, courses = tree_options(cfg)
    for i in range(n_inst):
        inst = f"inst-{i:02d}"
        irng = np_rng(seed, "edu-synth", inst)
        digit_prior = irng.dirichlet(np.full(10, cfg.label_skew))
        topic_prior = irng.dirichlet(np.full(TOPICS, cfg.label_skew))
        risk_offset = float(irng.normal(0, 0.7))
        inst_scale = float(np.exp(irng.normal(0, cfg.size_skew)))
        for s in range(cfg.students_per_institution):
            flat = f"global/{inst}/student-{s:03d}"
            srng = np_rng(
                seed, "edu-synth", flat
            )  # the flat id keys the rows: deeper trees hold the same data
            region = [f"region-{i % regions}"] if regions else []
            course = [f"course-{s % courses}"] if courses else []
            sid = "/".join(["global", *region, inst, *course, f"student-{s:03d}"])
            n = max(
                12,
                int(
                    round(
                        cfg.samples_per_student * inst_scale * np.exp(srng.normal(0, cfg.size_skew))
                    )
                ),
            )
            data = generate(
                n,
                srng,
                digit_prior=digit_prior,
                topic_prior=topic_prior,
                risk_offset=risk_offset,
                mix=mix,
            )
            mods: tuple[str, ...]
            tasks: tuple[str, ...]
            if i in essay_only:
                mods, tasks = ("tabular", "text"), ("essay_grade", "essay_topic")
            elif srng.random() < cfg.missing_modality:
                mods, tasks = ("tabular", "text"), ("dropout_risk", "essay_grade", "essay_topic")
            else:
                mods, tasks = (
                    ("image", "tabular", "text"),
                    ("digit", "dropout_risk", "essay_grade", "essay_topic"),
                )
            data.groups["access"] = np.full(n, "scanner" if "image" in mods else "no_scanner")
            n_test = max(1, int(round(n * cfg.test_fraction)))
            perm = srng.permutation(n)
            train[sid] = subset(data, perm[n_test:], tasks, mods)
            test[sid] = subset(data, perm[:n_test], tasks, mods)
            clients.append(ClientProfile(sid, mods, tasks, num_train=n - n_test, num_test=n_test))
    # the global held-out set: the population mixture, every modality and task present
    grng = np_rng(seed, "edu-synth", "global-test")
    parts = []
    per = np.full(n_inst, cfg.global_test_size // n_inst)
    per[: cfg.global_test_size - per.sum()] += 1
    for i in range(n_inst):
        irng = np_rng(seed, "edu-synth", f"inst-{i:02d}")
        parts.append(
            generate(
                int(per[i]),
                grng,
                digit_prior=irng.dirichlet(np.full(10, cfg.label_skew)),
                topic_prior=irng.dirichlet(np.full(TOPICS, cfg.label_skew)),
                risk_offset=float(irng.normal(0, 0.7)),
                mix=mix,
            )
        )
    global_test = ClientData(
        {m: np.concatenate([p.inputs[m] for p in parts]) for m in MODALITIES},
        {t: np.concatenate([p.labels[t] for p in parts]) for t in TASKS},
    )
    # resource classes (e.g. {light: 0.5, full: 0.5}): light students train heads and prompts only
    clients = assign_resources(clients, dict(cfg.options.get("resource_mix", {})), seed)
    return Federation(
        name="edu-synth",
        tier_names=tuple(
            [
                "global",
                *(["region"] if regions else []),
                "institution",
                *(["course"] if courses else []),
                "student",
            ]
        ),
        modalities=dict(MODALITIES),
        tasks=dict(TASKS),
        clients=clients,
        train=train,
        test=test,
        global_test=global_test,
        description="synthetic multi-modal education federation (generated, not real data)",
    )
