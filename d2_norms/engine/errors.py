"""Errors the engine raises for bad input or a diverged run: each message says what is wrong and
how to fix it. ``USER_ERRORS`` lists every error type that ``tools/train_net.py`` reports as a
plain message (no traceback): mistakes in the config, the data or the weights, not bugs."""
import difflib
from typing import Iterable, List, Mapping, Optional

from d2_norms.config import NORM_KEYS as _NORM_KEYS


class ConfigKeyError(KeyError):
    """A config file or command-line option names a key the config does not have."""

    def __str__(self):  # KeyError would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class ConfigFileError(ValueError):
    """A config file that does not exist or cannot be parsed."""


class BatchSizeError(ValueError):
    """SOLVER.IMS_PER_BATCH cannot be split evenly over the processes."""


class WeightsMismatchError(ValueError):
    """A checkpoint's parameters do not match the model built from the config."""


class NonFiniteLossError(FloatingPointError):
    """A training loss became NaN or infinite; training stopped before the optimizer step."""


class NonFiniteWeightsError(FloatingPointError):
    """Weights or buffers became NaN or infinite; no checkpoint is written from them."""


class DistributedSetupError(ValueError):
    """The launcher's environment, or the --num-gpus / --num-machines / --machine-rank /
    --dist-url flags, do not describe one consistent set of processes (bad input: exit code 2)."""


class LazyConfigError(ValueError):
    """A LazyConfig that cannot be loaded, overridden or saved (tools/lazyconfig_train_net.py)."""


class InputProblemsError(ValueError):
    """Every problem the preflight found in the input (config, data, weights), in one message."""

    def __init__(self, problems, what: str = "the input"):
        self.problems, self.what = [str(p) for p in problems], what
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in {what}; nothing was written "
                 f"(fix {'them' if n != 1 else 'it'} and run the same command again):"]
        for i, problem in enumerate(self.problems, 1):
            text = str(problem).replace("\n", "\n     ")
            lines.append(f"  {i}. {text}")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # travels to the other ranks (launch.run_on_main_process) as it is
        return type(self), (self.problems, self.what)


class Problems:
    """Collects input problems: ``with problems.check(): ...`` records a user error (an
    instance of :func:`user_error_types`) instead of raising it; :meth:`raise_if_any` raises
    one :class:`InputProblemsError` listing all of them."""

    def __init__(self):
        self.items = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def extend(self, messages) -> None:
        self.items.extend(messages)

    def check(self):
        problems = self

        class _Collect:
            def __enter__(self):
                return problems

            def __exit__(self, exc_type, exc, tb):
                if exc is None or not isinstance(exc, user_error_types()):
                    return False
                if isinstance(exc, InputProblemsError):
                    problems.extend(exc.problems)
                else:  # the error's name helps when searching the docs and issues
                    problems.add(f"{type(exc).__name__}: {exc}")
                return True

        return _Collect()

    def __bool__(self):
        return bool(self.items)

    def raise_if_any(self, what: str = "the input") -> None:
        if self.items:
            raise InputProblemsError(self.items, what)


def user_error_types() -> tuple:
    """Exception types that mean "fix your input" (printed without a traceback)."""
    from d2_norms.data import DatasetError
    from d2_norms.layers import GroupNormDivisibilityError, UnknownNormError

    from d2_norms.modeling.heads import HeadNormError

    return (ConfigKeyError, ConfigFileError, BatchSizeError, WeightsMismatchError,
            NonFiniteLossError, NonFiniteWeightsError, DatasetError, UnknownNormError,
            GroupNormDivisibilityError, DistributedSetupError, LazyConfigError,
            InputProblemsError, HeadNormError)


# ------------------------------------------------------------------------------------------------
# Remedies for a diverged run, shared by both non-finite errors.
# ------------------------------------------------------------------------------------------------


def _get(cfg, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError):
            return default
    return node


def norm_settings(cfg) -> List[str]:
    """``KEY='value'`` for each normalizer key of the config that is set."""
    out = []
    for key in _NORM_KEYS:
        value = _get(cfg, key)
        if value is not None:
            out.append(f"{key}={value!r}")
    return out


def divergence_remedies(cfg) -> str:
    """The usual fixes for a loss that blew up, with the config's current values."""
    solver = cfg.SOLVER
    clip = solver.CLIP_GRADIENTS
    norms = [str(_get(cfg, k, "")) for k in _NORM_KEYS]
    lines = [
        f"- a longer or gentler warm-up: SOLVER.WARMUP_ITERS (now {solver.WARMUP_ITERS}), "
        f"SOLVER.WARMUP_FACTOR (now {solver.WARMUP_FACTOR}), SOLVER.WARMUP_METHOD "
        f"(now {solver.WARMUP_METHOD!r}; 'cosine' ramps up more gently)",
        f"- a lower learning rate: SOLVER.BASE_LR (now {solver.BASE_LR:g}); for a smaller total "
        f"batch (now {solver.IMS_PER_BATCH}) scale it down linearly",
        "- with FRN: the learned-eps variant, norm name 'FRN_LEPS' instead of 'FRN' in the norm "
        "keys (FRN paper sec. 3.3; with lr ramp-up it was crucial where maps get small)"
        + (" (this run uses FRN)" if "FRN" in norms else ""),
        f"- gradient clipping: SOLVER.CLIP_GRADIENTS.ENABLED True (now {clip.ENABLED}) with "
        f"CLIP_TYPE 'full_model' or 'norm' and CLIP_VALUE (now {clip.CLIP_VALUE:g}); models "
        "without activation normalization (NF) have nothing to absorb a bad step"
        + (" (this run uses NF)" if "NF" in norms else ""),
    ]
    if "NF" in norms:
        std = [float(v) for v in (_get(cfg, "MODEL.PIXEL_STD", None) or [])]
        lines.insert(0, (
            f"- with NF: unit-variance inputs, MODEL.PIXEL_STD (now {std}); the NF-ResNet's "
            "signal propagation assumes them (NF paper sec. 3-4), on 0-255 pixels that is "
            "[57.375, 57.12, 58.395] (BGR)" + (" - this run's inputs are ~58x too large"
                                               if std and max(std) < 10 else "")))
    return "Usual remedies:\n  " + "\n  ".join(lines)


def format_values(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in values.items())


# ------------------------------------------------------------------------------------------------
# Close-match suggestions for config key typos.
# ------------------------------------------------------------------------------------------------
def flatten_keys(node, prefix: str = "") -> List[str]:
    """Every dotted key of a (nested) CfgNode / dict, leaves and inner nodes."""
    keys = []
    for name, value in node.items():
        full = f"{prefix}{name}"
        keys.append(full)
        if isinstance(value, Mapping):
            keys.extend(flatten_keys(value, full + "."))
    return keys


def suggest_keys(key: str, known: Iterable[str], n: int = 3) -> List[str]:
    """Close matches of a mistyped dotted key: first by the whole key, then by its last part
    within the same parent (``SOLVER.BASE_LRR`` -> ``SOLVER.BASE_LR``) and, for a mistyped
    parent, by last part anywhere (``MODEL.RESNET.NORM`` -> ``MODEL.RESNETS.NORM``)."""
    known = list(known)
    found: List[str] = []

    def add(items):
        for item in items:
            if item not in found:
                found.append(item)

    add(difflib.get_close_matches(key, known, n=n, cutoff=0.75))
    parent, _, leaf = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    add(by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.6))
    if len(found) < n:
        same_leaf = [k for k in known if k.rpartition(".")[2] == leaf]
        add(difflib.get_close_matches(key, same_leaf, n=n, cutoff=0.5))
    # Rank by similarity of the whole key; keep only those about as close as the best one.
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in found),
                    reverse=True)
    return [k for score, k in scored if score >= scored[0][0] - 0.08][:n] if scored else []


def unknown_key_message(key: str, known: Iterable[str], where: Optional[str]) -> str:
    close = suggest_keys(key, known)
    msg = f"unknown config key {key!r}"
    if where:
        msg += f" in {where}"
    msg += "."
    if close:
        msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
    else:
        msg += (" It is neither a detectron2 key nor one d2_norms adds "
                "(d2_norms.config.add_d2_norms_config).")
    return msg
