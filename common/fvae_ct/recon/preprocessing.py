"""The recon bundle's preprocessing chain (its ``preprocessing`` property), built from the bundle's options (a bad
one is a one-line :class:`~fvae_ct.errors.OptionError` of the transform that takes it); and the settings a chain was
built with.

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
    AxialSlicesd,
    HUWindowd,
    InPlaneResampled,
    LoadCTd,
    hu_window_of,
    recon_preprocessing,
    working_spacing_of,
)
from .script import SCRIPT_RANGE, SCRIPT_WINDOW, ScriptHUScaled, check_arithmetic

__all__ = ["recon_chain", "chain_settings"]


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
    window, spacing = hu_window_of(hu_window), working_spacing_of(working_spacing)  # the transforms check the rest
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
