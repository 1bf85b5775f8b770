"""What the panel says: the device/model indicator and the sentences for engine errors.

Kept apart from the widgets so the wording can be reviewed (and tested) in one place, without a
dock: analysts read these, so they name the fix, not the exception.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

ENGINE_MISSING = "engine_missing"
SETUP_BUTTON = "Set up the engine…"  # the dock button's text, named in the message below


def parameter_count(parameters: Any) -> Optional[int]:
    """Total parameters from the engine's ``model.parameters`` (an int or a dict of counts)."""
    if isinstance(parameters, (int, float)):
        return int(parameters)
    if isinstance(parameters, dict):
        if isinstance(parameters.get("total"), (int, float)):
            return int(parameters["total"])
        counts = [v for v in parameters.values() if isinstance(v, (int, float))]
        return int(sum(counts)) if counts else None
    return None


def describe_engine(info: Dict[str, Any]) -> str:
    """The device/model indicator text: which device answers and which model, how big."""
    device_type = str(info.get("device_type") or "cpu")
    device = str(info.get("device") or device_type)
    if device_type == "cuda":
        text = "CUDA: " + device
    else:
        text = device if device.upper().startswith("CPU") and device.lower() != "cpu" else "CPU"
    model = info.get("model")
    if isinstance(model, dict) and model.get("name"):
        count = parameter_count(model.get("parameters"))
        size = ""
        if count:
            size = f" ({count / 1e9:.1f} B parameters)" if count >= 1e9 else \
                f" ({count / 1e6:.1f} M parameters)"
        return f"{text} · model {model['name']}{size}"
    return f"{text} · no model installed"


def failure_text(code: str, message: str) -> str:
    """The panel's sentence for a failed request (engine error codes pass through)."""
    if code == "no_model":
        return (f"No model is available: {message.rstrip('.')}. "
                "A model folder can also be chosen in the RS-LVLM settings.")
    if code == "cancelled":
        return "Cancelled."
    if code == ENGINE_MISSING and "not found next to the plugin" not in message:
        return (f"The RS-LVLM engine is not set up yet: click \"{SETUP_BUTTON}\" below to create "
                "it, or choose an engine Python in the RS-LVLM settings.")
    return message or code


def result_warnings(result: Dict[str, Any]) -> List[str]:
    """The engine's ``warnings`` of a result as clean one-line strings (duplicates dropped)."""
    seen: List[str] = []
    for item in result.get("warnings") or []:
        text = " ".join(str(item).split())
        if text and text not in seen:
            seen.append(text)
    return seen


def model_name(result: Dict[str, Any]) -> str:
    """The model's name from a result, whether the engine reports a dict or a string."""
    model = result.get("model")
    if isinstance(model, dict):
        return str(model.get("name") or model.get("path") or "")
    return str(model or "")


def answered_by(result: Dict[str, Any]) -> str:
    """The "Answered by <model> on <device>" sentence (parts the engine left out are omitted)."""
    model, device = model_name(result), str(result.get("device") or "")
    return "Answered" + (f" by {model}" if model else "") + (f" on {device}" if device else "")
