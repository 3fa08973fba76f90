"""The recon bundle's preprocessing chain (its ``preprocessing`` property), built from the bundle's options, each
validated here with a one-line :class:`~fvae_ct.errors.OptionError`; and the settings a chain was built with.

``arithmetic: ours``: :func:`fvae_ct.transforms.recon_preprocessing` (``LoadCTd -> HUWindowd -> InPlaneResampled
-> AxialSlicesd``). ``arithmetic: script``: the same with :class:`~fvae_ct.recon.script.ScriptHUScaled` for the HU
window (the paper's Wan scripts, see :mod:`fvae_ct.recon.script`). File path or HU ``MetaTensor [1, X, Y, Z]`` ->
``[1, D, H, W]`` in the VAE's input range; ``Compose.inverse`` goes back to integer HU on the input's grid.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose

from ..errors import OptionError
from ..transforms import (
    DEFAULT_HU_WINDOW,
    HU_ROUNDING,
    SLICE_ORIENTATIONS,
    AxialSlicesd,
    HUWindowd,
    InPlaneResampled,
    LoadCTd,
    recon_preprocessing,
)
from .script import SCRIPT_RANGE, SCRIPT_WINDOW, ScriptHUScaled, check_arithmetic

__all__ = ["recon_chain", "chain_settings", "check_hu_window", "check_working_spacing"]


def check_hu_window(hu_window) -> tuple[float, float]:
    """``(low, high)`` floats of the ``hu_window`` option, or an :class:`OptionError`."""
    try:
        lo, hi = (float(v) for v in hu_window)
        ok = lo < hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        shown = list(hu_window) if isinstance(hu_window, (list, tuple)) else hu_window
        raise OptionError(f"hu_window {shown}: give [low, high] with low < high, e.g. [-1000, 1000]")
    return lo, hi


def check_working_spacing(working_spacing) -> float | None:
    """The ``working_spacing`` option in mm (``None``: the native grid), or an :class:`OptionError`."""
    if working_spacing in (None, "", "None", "none", "null"):
        return None
    try:
        mm = float(working_spacing)
    except (TypeError, ValueError):
        mm = float("nan")
    if not mm > 0:
        raise OptionError(f"working_spacing {working_spacing}: give a positive in-plane spacing in mm, or none")
    return mm


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise OptionError(f"{name} {value!r}: give one of {', '.join(allowed)}")
    return value


def recon_chain(
    hu_window=DEFAULT_HU_WINDOW,
    input_range: Sequence[float] = (0.0, 1.0),
    working_spacing: float | None = None,
    slice_orientation: str = "display",
    hu_rounding: str = "round",
    arithmetic: str = "ours",
    check_hu: bool = True,
    keys="image",
) -> Compose:
    """The invertible chain of the module docstring for a VAE taking ``input_range``."""
    window = check_hu_window(hu_window)
    spacing = check_working_spacing(working_spacing)
    _check_choice("slice_orientation", slice_orientation, SLICE_ORIENTATIONS)
    _check_choice("hu_rounding", hu_rounding, HU_ROUNDING)
    if check_arithmetic(arithmetic) == "ours":
        return recon_preprocessing(keys, window, input_range, spacing, check_hu, slice_orientation, hu_rounding)
    if window != SCRIPT_WINDOW:
        raise OptionError(f"hu_window {list(window)}: arithmetic 'script' clips to [-1000, 1000], as the scripts do")
    if tuple(float(v) for v in input_range) != SCRIPT_RANGE:
        raise OptionError(
            f"arithmetic 'script': the scripts give the VAE h / 1000 in [-1, 1]; this VAE takes {list(input_range)}: "
            "use arithmetic ours"
        )
    return Compose(
        [
            LoadCTd(keys, check_hu=check_hu),
            ScriptHUScaled(keys, rounding=hu_rounding),
            InPlaneResampled(keys, working_spacing=spacing),
            AxialSlicesd(keys, orientation=slice_orientation),
        ]
    )


def chain_settings(chain: Compose) -> dict:
    """What :func:`recon_chain` built ``chain`` from: ``hu_window``, ``input_range``, ``working_spacing``,
    ``slice_orientation``, ``hu_rounding``, ``arithmetic`` (recorded in summary.json)."""
    out: dict = {}
    for t in getattr(chain, "transforms", ()):
        if isinstance(t, HUWindowd):
            out.update(hu_window=t.window, input_range=t.out_range, hu_rounding=t.rounding, arithmetic="ours")
        elif isinstance(t, ScriptHUScaled):
            out.update(hu_window=SCRIPT_WINDOW, input_range=SCRIPT_RANGE, hu_rounding=t.rounding, arithmetic="script")
        elif isinstance(t, InPlaneResampled):
            out["working_spacing"] = t.working_spacing
        elif isinstance(t, AxialSlicesd):
            out["slice_orientation"] = t.orientation
    if len(out) != 6:
        raise ValueError(f"{chain!r} is not a recon preprocessing chain (fvae_ct.recon.recon_chain)")
    return out
