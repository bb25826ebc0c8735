"""The errors moe_compile raises on bad input; each message names the problem and the fix."""


class MoECompileError(ValueError):
    """Base of every moe_compile error."""


class NoFFNFoundError(MoECompileError):
    """convert() found no feed-forward block it could rewrite."""


class RecipeError(MoECompileError):
    """A saved model directory is damaged or does not match the model it is loaded into."""


class LoweringError(MoECompileError):
    """An export target cannot express a layer."""


class HFCheckpointError(MoECompileError):
    """A model or checkpoint cannot be written as (or read as the source of) a Hugging Face MoE checkpoint."""


def first_line(error: BaseException, limit: int = 160) -> str:
    """'<ErrorType>: <first line of its message>', for a report line or an error naming what went wrong."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:limit]}"
