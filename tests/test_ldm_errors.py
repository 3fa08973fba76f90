"""fvae_ldm: a bad option or input is one line naming it (OptionError / InputError), and evaluate.yaml's naming rule
that matches each volume to its label map."""

from __future__ import annotations

import pytest

from fvae_ct.errors import InputError, OptionError


def _one_line(exc_info, kind):
    assert type(exc_info.value) is kind, type(exc_info.value)
    assert "\n" not in str(exc_info.value)
    return str(exc_info.value)


def test_scheduler_and_training_batch_options():
    from fvae_ct.ldm import LDMPrepareBatch, make_scheduler

    with pytest.raises(OptionError) as e:
        make_scheduler("ddim")
    assert _one_line(e, OptionError) == "scheduler must be one of ddpm, rflow, got 'ddim'"
    with pytest.raises(OptionError) as e:
        make_scheduler(sampler=True, ddim_spacing="quad")
    assert _one_line(e, OptionError) == "ddim_spacing must be one of ldm, monai, got 'quad'"
    ddpm = make_scheduler()
    for kw, msg in [
        ({"p_uncond_mask": 1.5}, "p_uncond_mask must be a probability in [0, 1], got 1.5"),
        ({"p_uncond_text": -0.1}, "p_uncond_text must be a probability in [0, 1], got -0.1"),
        ({"p_uncond_both": "often"}, "p_uncond_both must be a probability in [0, 1], got 'often'"),
        ({"p_context": 2}, "p_context must be a probability in [0, 1], got 2"),
        ({"timesteps": "cosine"}, "timesteps must be one of uniform, paper_3d, got 'cosine'"),
    ]:
        with pytest.raises(OptionError) as e:
            LDMPrepareBatch(ddpm, **kw)
        assert _one_line(e, OptionError) == msg
    pb = LDMPrepareBatch(ddpm, p_uncond_mask="0.25", p_context=1)  # numbers given as text (a CLI override) are fine
    assert (pb.p_mask, pb.p_context) == (0.25, 1.0)


def test_sampling_options_are_checked_when_the_inferer_is_built():
    from fvae_ct.ldm import SamplingInferer

    for kw, msg in [
        ({"steps": 0}, "steps must be an integer in 1 .. 1000 (the training timesteps), got 0"),
        ({"steps": 1001}, "steps must be an integer in 1 .. 1000 (the training timesteps), got 1001"),
        ({"steps": 2.5}, "steps must be an integer in 1 .. 1000 (the training timesteps), got 2.5"),
        ({"scheduler": "rflow", "eta": 1.0}, "eta applies to DDIM sampling (scheduler ddpm), not to rectified flow: "
                                             "got eta 1.0"),
        ({"scheduler": "rflow", "long_volume": "official"}, "long_volume official re-injects the previous window's "
         "last latent the DDIM way: it needs scheduler ddpm, got rflow (or use long_volume chain / blend)"),
        ({"long_volume": "tiles"}, "long_volume must be one of chain, blend, official, got 'tiles'"),
        ({"scheduler": "ddim"}, "scheduler must be one of ddpm, rflow, got 'ddim'"),
    ]:
        with pytest.raises(OptionError) as e:
            SamplingInferer(progress=False, **kw)
        assert _one_line(e, OptionError) == msg, kw
    ok = SamplingInferer(scheduler="rflow", steps=1000, eta=0.0, long_volume="blend", progress=False)
    assert ok.steps == 1000


def test_chain_windows_refuse_an_overlap_outside_the_window():
    from fvae_ct.ldm.long_volume import chain_windows

    for overlap in (0, 16):
        with pytest.raises(OptionError) as e:
            chain_windows(40, 16, overlap)
        assert _one_line(e, OptionError) == (
            f"depth_overlap must be in 1 .. depth_window - 1 (15) for long_volume chain, got {overlap}"
        )


def test_prepare_refuses_an_unknown_mask_encoding_before_reading_anything(tmp_path):
    from fvae_ct.ldm import prepare_latents
    from fvae_ct.vae import load

    with pytest.raises(OptionError) as e:
        prepare_latents(str(tmp_path / "missing.json"), load("identity"), str(tmp_path / "c"), [1], "pixels")
    assert _one_line(e, OptionError) == "mask_encoding must be one of onehot, vae, got 'pixels'"
    assert not (tmp_path / "c").exists()


def test_segmenter_and_ctclip_inputs_name_the_file(tmp_path):
    from fvae_ct.ldm.generation_metrics import BundleSegmenter, CTClipScorer

    with pytest.raises(InputError) as e:
        BundleSegmenter(str(tmp_path / "seg"))
    msg = _one_line(e, InputError)
    assert msg == f"{tmp_path / 'seg' / 'configs' / 'inference.yaml'}: segmenter: no inference config in the " \
                  "segmentation bundle"
    with pytest.raises(InputError) as e:
        CTClipScorer(str(tmp_path), str(tmp_path / "w.pt"), "ct_clip.Model")
    assert _one_line(e, InputError).startswith(f"{tmp_path / 'w.pt'}: CT-CLIP weights not found")


def test_volumes_are_matched_to_their_label_maps_by_name(tmp_path):
    """evaluate.yaml reads folders, not a datalist: a volume takes <stem>_seg, <stem>_label or <stem> (.nii.gz first)
    from its label folder, a generated one without its _generated; *_seg / *_label files are not volumes."""
    from fvae_ct.ldm.evaluate import label_map_for, volume_stem, volumes_in

    gen, masks = tmp_path / "gen", tmp_path / "masks"
    for f in ("c0_generated.nii.gz", "c1_generated.nii", "c2.nii.gz", "c0_seg.nii.gz", "c1_label.nii", "notes.txt",
              "c3_generated.nii.gz"):
        (gen / f).parent.mkdir(exist_ok=True)
        (gen / f).touch()
    for f in ("c0_seg.nii.gz", "c0_label.nii.gz", "c0.nii.gz", "c1_label.nii", "c1_label.nii.gz", "c2.nii",
              "c2.nii.gz"):
        (masks / f).parent.mkdir(exist_ok=True)
        (masks / f).touch()
    vols = volumes_in(gen)
    assert [p.name for p in vols] == ["c0_generated.nii.gz", "c1_generated.nii", "c2.nii.gz", "c3_generated.nii.gz"]
    assert [volume_stem(p, generated=True) for p in vols] == ["c0", "c1", "c2", "c3"]
    assert volume_stem(vols[0]) == "c0_generated"
    found = {volume_stem(p): label_map_for(masks, volume_stem(p, generated=True)) for p in vols}
    assert {k: v.name if v else None for k, v in found.items()} == {
        "c0_generated": "c0_seg.nii.gz",  # _seg before _label before the stem itself
        "c1_generated": "c1_label.nii.gz",  # .nii.gz before .nii
        "c2": "c2.nii.gz",
        "c3_generated": None,
    }
    assert label_map_for(None, "c0") is None
    with pytest.raises(InputError) as e:
        volumes_in(tmp_path / "nope")
    assert _one_line(e, InputError) == f"{tmp_path / 'nope'}: folder does not exist"
