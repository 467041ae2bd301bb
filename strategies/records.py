"""Record keys and record <-> tensor conversions of the fl_unlearn message protocol.

Every key that travels in a Flower ``RecordDict`` or ``ConfigRecord`` is a constant here, kebab-case like
Flower's ``"num-examples"``, so server and client can never disagree on a spelling. Message types follow
``DESIGN.md`` section 3.

Examples
--------
>>> import torch
>>> rec = tensors_to_record({"fc.weight": torch.ones(2, 3)})
>>> record_to_tensors(rec)["fc.weight"].shape
torch.Size([2, 3])
>>> histogram_from_config(histogram_to_config({3: 5, 1: 2}))
{1: 2, 3: 5}
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from fl_unlearn.errors import RecordError
from fl_unlearn.fiun import FIUnConfig

# --- message types ------------------------------------------------------------------------------------
MSG_INFO = "query.info"
MSG_FISHER = "query.fisher"
MSG_EVAL_FORGET = "query.evalforget"
MSG_UNLEARN = "train.unlearn"
MSG_EVAL_HELD = "query.evalheld"  # held-out accuracy of models a client holds (derived), by id, for the report
MSG_CALIBRATE = "query.calibrate"  # alpha="auto": score every candidate alpha on the client's own samples
MSG_CHECK = "query.checkforget"  # alpha="auto", classes: per other affected model, the alpha that forgets
MSG_REPAIR_HELD = "train.repairheld"  # repair of client-held (derived) models on their holder's kept data, locally
MSG_REPAIR = "train.repair"  # optional repair after FIUn: capped SGD steps on kept data (strategies.repair)
MSG_REPAIR_SENT = "train.repairsent"  # repair-scope=all: server-held local models, repaired at the client that trained them
MSG_DERIVE = "train.derive"
MSG_ERASE = "train.erase"  # after a verified request: delete the superseded models a client holds
MSG_BASELINE = "train.baseline"  # method=finetune / gradient_ascent: steps on models the server sends, returned
MSG_BASELINE_HELD = "train.baselineheld"  # ... on models the client holds, stored as new versions
MSG_LOSSES = "query.losses"  # membership inference: per-sample losses of a client's forget rows (strategies.verify)
MSG_RETRAIN = "train.retrain"  # SISA exact path: one FedAvg round of a shard-model, revoked ids left out
MSG_SISA_COUNTS = "query.sisacounts"  # kept samples per shard and slice; checks requested ids
MSG_SISA_FISHER = "query.sisafisher"  # forget- / retain-Fisher of one shard's data at a served shard-model
MSG_SISA_SCORES = "query.sisascores"  # per-sample loss, correctness and true-label probability of revoked ids

# --- RecordDict keys --------------------------------------------------------------------------------
ARRAYS_KEY = "arrays"  # FedAvg's default ArrayRecord key
CONFIG_KEY = "config"  # FedAvg's default ConfigRecord key
METRICS_KEY = "metrics"
FISHER_KEY = "fl-unlearn-fisher"  # retain-Fisher accumulated during `train`; stripped by the wrapper
LINEAGE_KEY = "fl-unlearn-lineage"  # ConfigRecord describing the data a client update trained on
INFO_KEY = "info"
FORGET_FISHER_KEY = "forget-fisher"
RETAIN_FISHER_KEY = "retain-fisher"
MODEL_KEY_PREFIX = "model-"  # model-0, model-1, ...: several models in one message
NODE_KEY_PREFIX = "node-"  # node-0, node-1, ...: one ConfigRecord per derived / unlearned model

# --- ConfigRecord / MetricRecord keys -----------------------------------------------------------------
PARTITION_ID = "partition-id"
NUM_EXAMPLES = "num-examples"
HIST_CLASSES = "label-classes"
HIST_COUNTS = "label-counts"
SAMPLE_DIGEST = "sample-digest"
PARENT_ID = "parent-id"  # lineage id of the model a client starts from
NODE_ID = "node-id"
MODEL_IDS = "model-ids"
KIND = "kind"
DEPTH = "depth"
FISHER_LAYERS = "fisher-layers"
FISHER_ESTIMATOR = "fisher-estimator"
FORGET_CLASSES = "forget-classes"
FORGET_SAMPLES = "forget-samples"
FORGET_ALL = "forget-all"  # the whole partition is to be forgotten (client request)
EXCLUDE_CLASSES = "exclude-classes"  # retrain baseline: drop these classes before training
EXCLUDE_SAMPLES = "exclude-samples"  # retrain baseline: drop these sample ids before training
WANT_RETAIN = "want-retain"  # also send the retain-Fisher (retain-fisher=fresh / prepared)
ACCUMULATE = "accumulate-fisher"  # train / derive: accumulate and send the Fisher (retain-fisher=accumulated)
FISHER_SAMPLES = "fisher-samples"  # cap on the samples of each Fisher pass (0: all)
RETAIN_SAMPLES = "retain-samples"  # query.fisher: cap on the retain-Fisher's samples (default: fisher-samples)
PREPARE = "prepare"  # query.fisher after training: store per-class forget-Fishers, reply the whole partition's
PREPARED = "prepared"  # query.fisher reply: 1 when the forget-Fisher came from the prepared ones
SECONDS = "seconds"
ERASE_REASON = "erase-reason"  # train.erase: what the tombstones say
ERASED = "erased"  # train.erase reply: objects deleted
BYTES_FREED = "bytes-freed"  # train.erase reply
FIUN_ALPHA = "fiun-alpha"
STORE_DIR = "store-dir"  # where the server keeps its store: a default for client directories in simulation
WEIGHTS_DIGEST = "weights-digest"
FISHER_DIGEST = "fisher-digest"
FORGET_NUM = "forget-num-examples"
RETAIN_NUM = "retain-num-examples"
FORGET_ACC = "forget-acc"
RETAIN_ACC = "retain-acc"
BEFORE = "before-"
ALPHAS = "alphas"  # query.calibrate: the candidates' alphas (scale-free Fishers)
LAMS = "lams"  # query.calibrate: the candidates' dampening constants (parallel to ALPHAS)
REPAIR_SAMPLES = "repair-samples"  # train.repair: kept rows a client draws
REPAIR_STEPS = "repair-steps"  # train.repair: SGD steps this round (0: only report the validation loss)
REPAIR_LR = "repair-lr"
REPAIR_MOMENTUM = "repair-momentum"
REPAIR_BATCH = "repair-batch-size"
REPAIR_ROUND = "repair-round"
REPAIR_ROUNDS = "repair-rounds"  # train.repairheld: cap on local repair rounds
REPAIR_VAL_FRACTION = "repair-validation-fraction"
REPAIR_FORGET_WEIGHT = "repair-forget-weight"  # weight of the forget guard at the holders (0: kept data only)
VAL_LOSS = "val-loss-sum"  # train.repair reply: summed cross-entropy of the received weights on held-back rows
VAL_NUM = "val-num-examples"
FORGET_VAL_LOSS = "forget-val-loss-sum"  # train.repair reply: summed forget guard on held-back forget rows
FORGET_VAL_NUM = "forget-val-num-examples"
VAL_CORRECT = "val-correct"  # train.repair reply: held-back kept rows the received weights get right
FORGET_VAL_CORRECT = "forget-val-correct"  # train.repair reply: held-back forget rows still predicted
REPAIR_STOP = "repair-stop"  # train.repairheld / train.repairsent: stall | restore (fl_unlearn.calibrate.RepairConfig)
REPAIR_PART = "repair-part"  # train.repair / repairheld / repairsent: all | head (fl_unlearn.calibrate.RepairConfig)
REPAIR_MODE = "repair-mode"  # train.repairsent: auto (the rule decides per model) or on
REPAIR_TOLERANCE = "repair-tolerance"  # train.repairsent: kept-accuracy loss the rule accepts without repair
REPAIR_WANTED = "repair-wanted"  # train.repairsent reply: 1 when the model was repaired
BASELINE_METHOD = "baseline-method"  # train.baseline*: finetune | gradient_ascent (strategies.baseline)
BASELINE_STEPS = "baseline-steps"  # train.baseline*: SGD steps per model at this client (this round)
BASELINE_LR = "baseline-lr"
BASELINE_SAMPLES = "baseline-samples"  # train.baseline*: cap on the rows a client draws (kept, or forget)
BASELINE_BATCH = "baseline-batch-size"
BASELINE_ROUND = "baseline-round"  # train.baseline: the round (seeds the batch order)
ASCENT_LOSS_CEILING = "ascent-loss-ceiling"  # gradient_ascent: stop once a forget batch's loss reaches this
MIA_SAMPLES = "mia-samples"  # query.losses, query.evalheld: cap on the forget rows a client scores
MIA_SEED = "mia-seed"  # query.evalheld: seeds the members and non-members a holder scores (the run's seed)
BACKDOOR_TARGET = "backdoor-target"  # query.evalheld: the backdoor's target class (attack success rate)
MIA_AUC = "mia-auc"  # query.evalheld reply, per model: loss-threshold membership-inference AUC
BACKDOOR_ASR = "backdoor-asr"  # query.evalheld reply, per model: attack success rate of the backdoor
LOSSES_PREFIX = "losses-"  # query.losses reply: losses-0, ...: one MetricRecord per sent model
LOSSES = "losses"
BASELINE_STOP = "baseline-stop"  # train.baseline* reply: budget | loss_ceiling | no_data (fl_unlearn.baselines)
ORIGINAL_KEY_PREFIX = "original-"  # train.repairsent: original-0, ...: each model before unlearning, for the rule
FORGET_CORRECT = "forget-correct"  # query.calibrate reply: correct forget predictions per alpha
RETAIN_CORRECT = "retain-correct"  # query.calibrate reply: correct kept predictions per alpha
RETAIN_LOSS = "retain-loss"  # query.calibrate reply: summed cross-entropy of the kept samples per alpha
CALIBRATION_FORGET = "calibration-forget-samples"  # forget samples a client scores (cap)
CALIBRATION_RETAIN = "calibration-retain-samples"  # kept samples a client scores (cap)
CALIBRATION_CHECK = "calibration-check-samples"  # forget samples per client for the per-model check (cap)
OWN_FISHER_SAMPLES = "own-fisher-samples"  # rows per holder for a model's own forget-Fisher (cap; after a failed check)
CALIBRATION_STOP = "calibration-stop-when-kept"  # class requests: walk each lambda's alphas, stop at the first miss
CALIBRATION_BUDGET = "calibration-keep-budget"  # ... that keeps more than this many forget samples
CHECK_MODEL_PREFIX = "check-model-"  # query.checkforget: the other affected models, check-model-0, ...
CHECK_FISHER_PREFIX = "check-fisher-"  # query.checkforget: their distinct forget-Fishers, check-fisher-0, ...
CHECK_FISHER_OF = "check-fisher-of"  # query.checkforget: per check model, the index of its forget-Fisher
CHECK_ROWS = "check-rows"  # query.checkforget: per check model, the forget samples this holder checks it on (cap)
CHECK_COUNTS = "check-counts"  # query.checkforget reply: per model and step, forget samples kept (calibrate.check_models)
CHECK_BUDGET = "check-budget"  # forget samples every holder of a checked model may keep in all (counts stop above)
CHECK = "check"  # train.unlearn reply, per model: met | own-fisher | not-met (the holder's own per-model check)
SCALE_FREE = "scale-free"  # train.unlearn: alpha applies to mean-normalised Fishers (alpha="auto")
AFTER = "after-"
# SISA (strategies.sisa_server / sisa_client): the layout, the round, and what a client reports
SISA_SHARDS = "sisa-shards"
SISA_SLICES = "sisa-slices"
SISA_LAYOUT_SEED = "sisa-layout-seed"
SISA_SHARD = "sisa-shard"  # present in a `train` message: train this shard-model (routed by sisa_client.sisa_mod)
SISA_STAGE = "sisa-stage"  # train on slices 1..stage
SISA_KEY = "sisa-key"  # seed tuple (strings) of the round: batch order and torch seed derive from it
SISA_FRACTION = "sisa-fraction"  # share of each epoch's hash order to train on (OHS: 0.5)
SISA_COUNTS = "sisa-counts"  # kept samples per shard and slice, row-major [S, R]
MISSING_SAMPLES = "missing-samples"  # requested ids the client does not hold
KEPT_SAMPLES = "kept-samples"  # every id the client still holds (client-level requests)
LOSSES = "losses"
CORRECT = "correct"
TRUE_PROBS = "true-probs"
LABELS = "labels"


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack a ``{name: tensor}`` dict into an ArrayRecord (values copied to CPU numpy)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Unpack an ArrayRecord into a ``{name: tensor}`` dict of writable CPU tensors.

    Records come from the network, so decoding is checked: numpy's loader runs with ``allow_pickle=False``
    (Flower's ``Array.numpy``), and anything that is not a numeric array becomes a ``RecordError``.

    Raises
    ------
    RecordError
        Not an ArrayRecord, undecodable bytes, a non-numeric dtype (strings, objects, structured).
    """
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {str(k): _array_to_tensor(str(k), v) for k, v in record.items()}


def _array_to_tensor(name: str, array: Array) -> torch.Tensor:
    try:
        value = array.numpy()
    except Exception as err:  # noqa: BLE001  (untrusted bytes: every decoding failure is the sender's fault)
        raise RecordError(f"array {name!r:.80} cannot be decoded: {type(err).__name__}: {err!s:.200}") from err
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        kind = value.dtype if isinstance(value, np.ndarray) else type(value).__name__
        raise RecordError(f"array {name!r:.80} has dtype {kind}; expected a numeric (bool, int, float) array")
    try:
        return torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="), copy=True))
    except (TypeError, ValueError, RuntimeError) as err:
        raise RecordError(f"array {name!r:.80} ({value.dtype}) has no torch equivalent: {err}") from err


def histogram_to_config(hist: Mapping[int, int]) -> dict[str, list[int]]:
    """A label histogram as two int lists (ConfigRecord values cannot be dicts)."""
    classes = sorted(int(c) for c in hist)
    return {HIST_CLASSES: classes, HIST_COUNTS: [int(hist[c]) for c in classes]}


def histogram_from_config(config: Mapping) -> dict[int, int]:
    """Inverse of :func:`histogram_to_config`.

    Raises
    ------
    RecordError
        (a ``ValueError``) ragged lists, repeated classes, values that are not non-negative ints.
    """
    classes, counts = int_list(config.get(HIST_CLASSES)), int_list(config.get(HIST_COUNTS))
    if len(classes) != len(counts):
        raise RecordError(f"label histogram has {len(classes)} classes but {len(counts)} counts")
    if len(set(classes)) != len(classes):
        raise RecordError(f"label histogram lists a class twice: {classes[:20]}")
    return dict(zip(classes, counts, strict=True))


def sample_digest(ids: Iterable[int]) -> str:
    """A stable sha256 digest of a set of sample ids (order does not matter)."""
    arr = np.sort(np.fromiter((int(i) for i in ids), dtype=np.int64))
    return hashlib.sha256(arr.tobytes()).hexdigest()


def int_list(value: object) -> list[int]:
    """Read a list of non-negative ints (ids, counts) from a ConfigRecord value (absent -> []).

    Raises
    ------
    RecordError
        (a ``ValueError``) a value that is not an int (bools, floats and strings are refused) or is negative.
    """
    if value is None:
        return []
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0]
    if bad:
        raise RecordError(f"expected non-negative integer ids or counts, got {bad[:10]!r:.200}")
    return [int(v) for v in values]


def is_digest(value: object) -> bool:
    """Whether ``value`` is a sha256 hex digest (how stores name weights)."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def fiun_from_config(config: Mapping) -> FIUnConfig:
    """The ``FIUnConfig`` a message carries as ``fiun-*`` values (``strategies.server.fiun_config``)."""
    return FIUnConfig(**{k[len("fiun-"):]: v for k, v in config.items() if k.startswith("fiun-")})


def first_config(msg: Message, key: str = CONFIG_KEY) -> ConfigRecord:
    """The ConfigRecord ``key`` of a message, else its only ConfigRecord, else an empty one."""
    records = msg.content.config_records
    if key in records:
        return records[key]
    if len(records) == 1:
        return next(iter(records.values()))
    return ConfigRecord()


def numbered(prefix: str, n: int) -> list[str]:
    """``numbered("model-", 3) == ["model-0", "model-1", "model-2"]``."""
    return [f"{prefix}{i}" for i in range(n)]
