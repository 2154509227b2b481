"""NaN or infinite weights are never written, never loaded and never published (issue 20, "3D").

Served, such a network answers NaN for every voxel: that is what the app's all-NaN 3D volumes of the issue-20
report were (a test training that diverged wrote NaN weights and the app served them). So:

- :func:`lib.weights.export_weights` refuses a network holding NaN or infinite values, also values beyond float16
  when it writes float16, and writes nothing;
- :func:`lib.predict.load_denoiser` refuses such a file (one written before the refusal, or by other code);
- gated fine-tuning whose training diverges leaves no candidate file and the gate rejects it as "finite_weights"
  (not through comparisons with NaN); ``train`` on the command line ends with a clear error and no file.

Divergence is made deterministic by Adam at a learning rate of 1e6: its first step moves every weight with a
gradient by about the learning rate, beyond float16's 65504.
"""
from __future__ import annotations

import pytest
import torch

from conftest import SAMPLE_STUDIES, import_cli
from mlserver import TINY_ADL, copy_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CT_SLICE = SAMPLE_STUDIES / "ct_head_pydicom693.nii.gz"


def _tiny_config(**overrides):
    from lib.engines import ADLTrainingConfig

    base = dict(modality="CT", patch_size=32, batch_size=2, steps_g_warmup=2, steps_d_warmup=0, steps_adversarial=0,
                validation_every=0, checkpoint_every=0, device="cpu", seed=0, **TINY_ADL)
    return ADLTrainingConfig(**{**base, **overrides})


def test_export_refuses_nan_and_float16_overflow_and_writes_nothing(tmp_path):
    from lib.engines import build_networks
    from lib.weights import NonFiniteWeightsError, export_weights

    config = _tiny_config()
    network = build_networks(config)[0]
    assert export_weights(network, tmp_path / "sound.pt", config).is_file()
    name = next(k for k in network.state_dict() if k.endswith("conv1.weight"))
    with torch.no_grad():
        network.state_dict()[name].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=rf"diverged.pt not written: 1 tensor\(s\).*{name}"):
        export_weights(network, tmp_path / "diverged.pt", config)
    assert not (tmp_path / "diverged.pt").exists()
    with torch.no_grad():
        network.state_dict()[name].view(-1)[0] = 1e6  # finite in float32, infinite in float16
    with pytest.raises(NonFiniteWeightsError, match="float16"):
        export_weights(network, tmp_path / "overflow.pt", config)
    assert not (tmp_path / "overflow.pt").exists()
    assert export_weights(network, tmp_path / "float32.pt", config, half=False).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float32.pt", "sound.pt"]  # no temp file left


def test_load_refuses_a_file_holding_nan(tmp_path):
    from lib.engines import build_networks
    from lib.predict import load_denoiser
    from lib.weights import NonFiniteWeightsError, export_weights

    config = _tiny_config()
    path = export_weights(build_networks(config)[0], tmp_path / "w.pt", config)
    assert load_denoiser(path).network is not None
    payload = torch.load(path, weights_only=True)  # what older code could write: the same file with a NaN
    name = next(k for k in payload["state_dict"] if k.endswith("running_var"))
    payload["state_dict"][name][0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    with pytest.raises(NonFiniteWeightsError, match=rf"nan.pt is not usable: 1 tensor\(s\).*{name}.*diverged"):
        load_denoiser(tmp_path / "nan.pt")


@pytest.mark.slow
def test_fine_tuning_that_diverges_writes_no_candidate_and_is_never_published(tmp_path, tiny_weights):
    from lib.data import SyntheticNoiseSource
    from lib.engines.gated_fine_tuning import FineTuneSettings, decide_publication, fine_tune
    from lib.weights import ModelStore

    source = SyntheticNoiseSource([CT_SLICE], "CT", "gaussian", noise_level_range=(20, 40), seed=0, progress=False)
    store = ModelStore(copy_weights(tiny_weights, tmp_path / "model"))
    served = store.served("adl", "CT")
    scored = []
    result = fine_tune(served.path, source, source.validation_pairs(), tmp_path / "candidate.pt",
                       FineTuneSettings(steps=2, patch_size=32, batch_size=2, lr=1e6, device="cpu"),
                       on_scored=lambda which, score: scored.append((which, score["psnr"])))
    assert result.candidate is None and not (tmp_path / "candidate.pt").exists()
    assert "candidate.pt not written" in result.diverged and "NaN or infinite" in result.diverged
    assert not result.no_worse and scored[1] == ("candidate", float("-inf"))
    assert result.candidate_score["images"].keys() == result.baseline_score["images"].keys()
    decision = decide_publication(result, store, "adl", "CT", checks=[])
    assert decision["published"] is False and decision["rejected_by"] == ["finite_weights"]
    assert decision["candidate_psnr"] is None and "diverged" in decision["reason"]
    assert store.history("adl", "CT")[-1]["event"] == "rejected"
    assert store.served("adl", "CT").sha256 == served.sha256


@pytest.mark.slow
def test_cli_train_that_diverges_says_so_and_writes_no_file(tmp_path, capsys):
    cli = import_cli()
    output = tmp_path / "w.pt"
    args = ["train", "--output", str(output), "--modality", "ct", "--clean", str(CT_SLICE), "--noise", "gaussian",
            "--patch-size", "32", "--batch-size", "2", "--filters", "8,12,16,20", "--disc-filters", "4,6,8,10",
            "--enhancer-filters", "4", "--device", "cpu", "--validation-every", "0", "--checkpoint-every", "0",
            "--steps-g-warmup", "2", "--steps-d-warmup", "0", "--steps-adversarial", "0", "--seed", "0"]
    assert cli.main(args + ["--lr-warmup", "1e6"]) == 2
    error = capsys.readouterr().err
    assert "w.pt not written" in error and "NaN or infinite" in error and "lower learning rate" in error, error
    assert "--overwrite" in error and "holds the diverged run's checkpoint" in error, error
    assert not output.exists()
    # the same run, sound: over the diverged run's checkpoint, as the message says
    assert cli.main(args + ["--lr-warmup", "1e-4", "--overwrite"]) == 0 and output.is_file()


@pytest.mark.server
@pytest.mark.slow
def test_the_app_answers_500_naming_the_weights_when_the_served_file_holds_nan(tmp_path, tiny_weights):
    """A NaN weight file on the server (written by older code, or copied in by hand) is the server's fault, not the
    image's: HTTP 500 saying which weights are unusable, no result; the other models and modalities go on."""
    import json
    import urllib.error
    import urllib.request

    from mlserver import shared_studies, start_server, stop_server

    model_dir = copy_weights(tiny_weights, tmp_path / "model")
    payload = torch.load(model_dir / "pretrained_adl_ct.pt", weights_only=True)
    name = next(k for k in payload["state_dict"] if k.endswith("conv1.weight"))
    payload["state_dict"][name].view(-1)[0] = float("nan")
    torch.save(payload, model_dir / "adl_ct.pt")  # a published version beats the pretrained one
    server = start_server(shared_studies(tmp_path / "studies"), model_dir, tmp_path / "work")
    try:
        def infer(model: str, image: str) -> tuple[int, str]:
            request = urllib.request.Request(f"{server.url}/infer/{model}?image={image}&output=json", method="POST",
                                             data=b"")
            try:
                with urllib.request.urlopen(request, timeout=600) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, error.read().decode()

        status, body = infer("adl", "ct_slab_b")
        assert status == 500, body
        detail = json.loads(body)["detail"]
        assert "served adl weights are unusable" in detail and "adl_ct.pt" in detail and "NaN" in detail, detail
        assert infer("adl", "mr_slab_d")[0] == 200  # the MR weights are sound
        assert infer("tddl_gcn", "ct_slab_b")[0] == 200
        # likewise a file whose restoration entry names no width (edited by hand) and a damaged file: 500 naming
        # the file, never a 4xx that reads as if the image were wrong
        gcn = torch.load(model_dir / "pretrained_tddl_gcn_ct.pt", weights_only=True)
        torch.save(dict(gcn, low_frequency_restoration={"sigma_px": "wide"}), model_dir / "tddl_gcn_ct.pt")
        (model_dir / "adl_mr.pt").write_bytes(b"not a weight file" * 100)
        for model, image, words in (("tddl_gcn", "ct_slab_b", ("tddl_gcn_ct.pt", "restoration width")),
                                    ("adl", "mr_slab_d", ("adl_mr.pt", "not a readable"))):
            status, body = infer(model, image)
            detail = json.loads(body)["detail"]
            assert status == 500 and f"served {model} weights are unusable" in detail, (status, detail)
            assert all(word in detail for word in words), detail
    finally:
        stop_server(server)
