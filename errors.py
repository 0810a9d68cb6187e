"""User-facing errors: each is one sentence that names the thing and what to do."""

from __future__ import annotations


class WinnowError(Exception):
    """Base of every error the CLI prints as one sentence and exits 2 on."""

    exit_code = 2

    def for_cli(self) -> str:
        """The sentence as the command line prints it (options named as flags)."""
        return str(self)


class SourceError(WinnowError):
    """A model source (path, folder, zoo name) is missing or cannot be read."""


class ModelFormatError(WinnowError):
    """A model file exists but is not a valid model (corrupt, truncated, unsafe)."""


class UnsupportedModelError(WinnowError):
    """A model uses something winnow or its runtime cannot handle."""


class PipelineError(WinnowError):
    """A pipeline text or config names an unknown pass or a bad option."""


class PassConfigError(WinnowError, ValueError):
    """A pass was built with a bad config value; the message names the field."""


class PassRegistrationError(WinnowError, ValueError):
    """A pass cannot be registered: a bad name, a Config without defaults, a name already taken,
    or a `winnow.passes` plugin entry point that fails to load; the message names its origin."""


class PassFailedError(WinnowError):
    """A pass raised while running; the message names it and the passes before it."""


class VerificationError(WinnowError):
    """A model failed the checker, shape inference or the structural lint."""


class ExecutionError(WinnowError):
    """ONNX Runtime could not build or run a session for a model."""


class TargetError(WinnowError):
    """A compile target is unknown, or its toolchain (cross compiler, emulator) is missing."""


class OutputError(WinnowError):
    """An output folder cannot be written."""


class OutputExistsError(OutputError):
    """An output folder exists and the caller did not ask to replace it."""

    def __init__(self, path: object, what: str) -> None:
        self.path, self.what = path, what
        super().__init__(self._sentence("overwrite=True (--force-overwrite on the command line)"))

    def _sentence(self, how: str) -> str:
        return (f"output folder '{self.path}' already exists ({self.what}); pass {how} to "
                "replace it, or choose another path.")

    def for_cli(self) -> str:
        """The sentence naming the --force-overwrite flag."""
        return self._sentence("--force-overwrite")


class InputsError(WinnowError):
    """Inputs given for a model (--input-shapes, --example-inputs) are malformed or do not fit it."""


class FidelityError(WinnowError):
    """A lossy result fell below the fidelity budget."""


class MissingExtraError(WinnowError):
    """A feature needs the packages of an install extra (`winnow[NAME]`) that is missing."""


def require_extra(feature: str, extra: str, modules: tuple[str, ...] | list[str]) -> None:
    """Raise MissingExtraError naming `winnow[extra]` when one of `modules` is not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{feature} needs the extra winnow[{extra}] (pip install "
                                f"'winnow[{extra}]'; missing: {', '.join(missing)}).")


def runtime_detail(exc: BaseException) -> str:
    """ONNX Runtime's message on one line without its status prefix, C++ source locations
    (file:line and the function signature), failed-check expressions or node signatures,
    keeping every detail line."""
    import re

    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ", "", str(exc).strip())
    text = _drop_node_signature(_drop_cpp_location(text))
    lines = [line.strip().rstrip(".") for line in text.splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith("Please fix"))


def _drop_cpp_location(text: str) -> str:
    """Remove 'path/file.cc:123 [type] ns::Function(args...) [with T = ...] ' prefixes (or a
    bare function name after the location) from a C++ message."""
    import re

    while (match := re.search(r"[\w./-]*\w\.(?:cc|cpp|cxx|h|hpp):\d+\s*", text)):
        rest = text[match.end():]
        call = re.match(r"[^\s(]*(?:\s[^\s(]+)?\(", rest)
        if call and "::" in call.group(0):
            rest = rest[_closing(rest, call.end() - 1):].lstrip()
            if rest.startswith("[with "):
                rest = rest[_closing(rest, 0):].lstrip()
        else:
            rest = re.sub(r"^(?:operator\S*|[A-Za-z_~]\w*(?:\(\))?)\s+", "", rest, count=1)
        text = text[:match.start()] + _drop_failed_check(rest)
    return text


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at `start` (the end if it never does)."""
    pairs = {"(": ")", "[": "]"}
    opening, closing = text[start], pairs[text[start]]
    depth = 0
    for index in range(start, len(text)):
        depth += {opening: 1, closing: -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    return len(text)


def _drop_failed_check(rest: str) -> str:
    """'<C++ condition> was false. <message>' right after a location -> '<message>'
    (ORT_ENFORCE's wording)."""
    import re

    check = re.match(r"[^\n]*? was false\.?[ \t]*", rest)
    if check is None:
        return rest
    rest = rest[check.end():]
    return rest if rest[:1].strip() else "an internal check of ONNX Runtime failed" + rest


def _drop_node_signature(text: str) -> str:
    """'In Node, ("f", FooBar, "", -1) : (inputs) -> (outputs) , Error msg' -> "In node 'f'
    (FooBar): msg"."""
    import re

    def label(match: re.Match) -> str:
        name, op = match.group(1), match.group(2).strip()
        return f"In node '{name}' ({op}): " if name else f"In an unnamed {op} node: "

    return re.sub(r'In Node, \("([^"]*)", ([^,]+), "[^"]*", -?\d+\) : .*? , Error ', label,
                  text, flags=re.DOTALL)


class LosslessPassError(PassFailedError):
    """A pass that claims to be lossless changed the outputs (raised under --strict)."""
