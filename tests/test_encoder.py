"""Backbones, ITQ/LSH heads and the encoder file: real weights, real images, exact round trips."""
import json

import numpy as np
import pytest
import torch
import torchvision

from hashindex import metrics
from hashindex.backbones import BackboneError, BackboneSpec, SimAM, create_backbone
from hashindex.encoder import Encoder, EncoderError
from hashindex.encoder_file import EncoderFile
from hashindex.methods import create_method
from hashindex.methods.base import MethodError


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0", image_size=64)


@pytest.fixture(scope="module")
def sample(fmnist_features):
    return fmnist_features


def test_pretrained_backbone_recognises_a_photo(backbone):
    from sklearn.datasets import load_sample_image
    net = create_backbone("efficientnet-lite0", image_size=224)
    x = net.preprocess(load_sample_image("flower.jpg")[None])
    with torch.inference_mode():
        probs = net.classifier(net(x)).softmax(-1)[0]
    assert int(probs.argmax()) == 985  # ImageNet class 985 "daisy": the weights really are pretrained


def test_features_are_deterministic_and_per_image(backbone, sample):
    pixels = sample["pixels"][:16]
    batch = backbone.features(pixels)
    alone = np.concatenate([backbone.features(pixels[i:i + 1]) for i in range(4)])
    assert batch.shape == (16, 1280)
    np.testing.assert_allclose(batch[:4], alone, rtol=1e-4, atol=1e-4)
    # varying-size inputs are resized per image: a list gives what the stacked array gives
    np.testing.assert_allclose(backbone.features(list(pixels[:4])), batch[:4], rtol=1e-5, atol=1e-5)


def test_torchvision_backbone_needs_a_local_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="needs a local weights file"):
        create_backbone("resnet18")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    net = create_backbone("resnet18", weights=str(weights), image_size=64)
    assert net.features(np.zeros((2, 40, 30, 3), np.uint8)).shape == (2, 512)
    assert net.spec.weights_sha256 and len(net.spec.weights_sha256) == 64
    wrong = tmp_path / "vgg.pth"
    torch.save({"nonsense": torch.zeros(1)}, wrong)
    with pytest.raises(BackboneError, match="does not fit resnet18"):
        create_backbone("resnet18", weights=str(wrong))


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(BackboneError, match="efficientnet-lite0.*resnet18"):
        create_backbone("inception")


def _encoder(method, sample, bits=32):
    head = create_method(method, bits, seed=0).fit(sample["features"][:1000])
    return Encoder(method=method, bits=bits, backbone=BackboneSpec("efficientnet-lite0", 64), head=head)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_itq_beats_lsh_on_held_out_queries(sample, bits):
    train, test = slice(0, 1000), slice(1000, 1200)
    scores = {}
    for method in ("itq", "lsh"):
        enc = _encoder(method, sample, bits)
        codes = enc.encode_features(sample["features"])
        scores[method] = metrics.mean_average_precision(codes[test], codes[train], sample["labels"][test],
                                                        sample["labels"][train])
    assert scores["itq"] > scores["lsh"] > 0.1  # 0.1 = chance level for 10 balanced classes


def test_itq_rotation_reduces_quantization_loss(sample):
    itq = create_method("itq", 32, n_iter=30)
    itq.fit(sample["features"][:1000])
    losses = itq.quantization_loss_
    assert losses[-1] < losses[0] and all(b <= a + 1e-9 for a, b in zip(losses, losses[1:]))


def test_encoder_round_trips_bit_for_bit(sample, tmp_path):
    enc = _encoder("itq", sample)
    path = enc.save(tmp_path / "itq.encoder")
    loaded = Encoder.load(path)
    assert loaded.id == enc.id and loaded.config == enc.config
    assert (loaded.encode_features(sample["features"]) == enc.encode_features(sample["features"])).all()
    assert loaded.encode_pixels(sample["pixels"][:50]).shape == (50, 4)


def test_image_alone_gets_the_same_bits_as_in_a_batch(sample):
    enc = _encoder("itq", sample)
    batch = enc.encode_pixels(sample["pixels"][:64])
    alone = np.concatenate([enc.encode_pixels(sample["pixels"][i:i + 1]) for i in range(64)])
    assert (batch == alone).all()


def test_encoder_id_is_a_content_hash(sample):
    a, b = _encoder("itq", sample), _encoder("itq", sample)
    assert a.id == b.id
    assert _encoder("lsh", sample).id != a.id


def test_corrupt_encoder_file_is_a_clear_error(sample, tmp_path):
    path = tmp_path / "bad.encoder"
    path.write_bytes(b"not an encoder at all")
    with pytest.raises(EncoderError, match="not a hashindex encoder file"):
        Encoder.load(path)
    data = bytearray(_encoder("itq", sample).to_bytes())
    data[-5] ^= 0xFF  # flip bits inside the weights
    path.write_bytes(bytes(data))
    with pytest.raises(EncoderError, match="does not match its id"):
        Encoder.load(path)
    with pytest.raises(EncoderError, match="cannot read encoder"):
        Encoder.load(tmp_path / "missing.encoder")
    # the jobs' torch-free reader refuses the same files with the same words
    for bad, message in ((b"not an encoder at all", "not a hashindex encoder file"),
                         (bytes(data), "does not match its id")):
        path.write_bytes(bad)
        with pytest.raises(EncoderError, match=message):
            EncoderFile.read(path)
    with pytest.raises(EncoderError, match="cannot read encoder"):
        EncoderFile.read(tmp_path / "missing.encoder")


def test_the_jobs_read_an_encoder_file_without_torch(sample, tmp_path):
    """`hashindex encode` and `update` start a build knowing only the encoder's id, bits, config and
    bytes: read from the file with numpy, equal to the full encoder's, and torch never imported."""
    import subprocess
    import sys
    enc = _encoder("itq", sample)
    path = enc.save(tmp_path / "itq.encoder")
    light = EncoderFile.read(path)
    assert (light.id, light.bits, light.method, light.config) == (enc.id, enc.bits, enc.method, enc.config)
    assert light.to_bytes() == open(path, "rb").read() and light.load().id == enc.id
    script = ("import sys, json; import hashindex.cli, hashindex.update, hashindex.indexing\n"
              "from hashindex.encoder_file import EncoderFile\n"
              f"e = EncoderFile.read({str(path)!r})\n"
              "print(json.dumps([e.id, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [enc.id, False]


@pytest.mark.parametrize("bits, message", [(12, "multiple of 8"), (0, "multiple of 8")])
def test_method_rejects_bad_bits(sample, bits, message):
    with pytest.raises(MethodError, match=message):
        create_method("itq", bits).fit(sample["features"])


def test_method_rejects_bad_training_data():
    with pytest.raises(MethodError, match="NaN"):
        create_method("lsh", 8).fit(np.full((4, 3), np.nan))
    with pytest.raises(MethodError, match="at least 16 training images"):
        create_method("itq", 16).fit(np.random.default_rng(0).standard_normal((10, 32)))
    with pytest.raises(MethodError, match="unknown method 'foo'.*itq"):
        create_method("foo", 8)
    with pytest.raises(MethodError, match="itq takes no parameter 'epochs'"):
        create_method("itq", 8, epochs=3)


@pytest.mark.parametrize("method", ["uhga", "dpfah", "nrdh", "lagnh", "ucsh"])
def test_deep_methods_reject_a_misspelt_parameter(method, tmp_path):
    with pytest.raises(MethodError, match=f"{method}: unknown parameter 'epoch' .*epochs"):
        create_method(method, 16, epoch=3)
    config = tmp_path / "mine.json"
    config.write_text('{"epochs": 2, "learning_rate": 0.1}')
    with pytest.raises(MethodError, match="unknown parameter 'learning_rate'"):
        create_method(method, 16, config=str(config))
    assert create_method(method, 16, epochs=2, backbone_lr_factor=0.5).config["epochs"] == 2


def test_stem_attention_is_part_of_the_spec_and_old_specs_read_as_before():
    plain = BackboneSpec("efficientnet-lite0", 64)
    simam = BackboneSpec("efficientnet-lite0", 64, stem_attention="simam")
    # a plain spec records and prints as before the field existed: old encoder ids and cache keys hold
    assert plain.to_dict() == {"name": "efficientnet-lite0", "image_size": 64, "weights": None, "weights_sha256": None}
    assert repr(plain) == ("BackboneSpec(name='efficientnet-lite0', image_size=64, weights=None, "
                           "weights_sha256=None)")
    assert simam.to_dict()["stem_attention"] == "simam" and "stem_attention='simam'" in repr(simam)
    assert BackboneSpec(**plain.to_dict()) == plain and BackboneSpec(**simam.to_dict()) == simam
    with pytest.raises(BackboneError, match="unknown stem attention 'cbam'"):
        create_backbone("efficientnet-lite0", stem_attention="cbam")


def test_feature_blocks_pool_those_blocks_and_are_part_of_the_spec(sample):
    """A spec's ``blocks`` gives the spatial means of those blocks' outputs, concatenated, in place of
    the pooled head; it is recorded (an old, plain spec is unchanged) and checked before any build."""
    from hashindex.backbones import load_backbone
    spec = BackboneSpec("efficientnet-lite0", 32, blocks=[10, 12, 14])
    assert spec.blocks == (10, 12, 14) and BackboneSpec(**spec.to_dict()) == spec
    assert spec.to_dict()["blocks"] == [10, 12, 14] and "blocks=(10, 12, 14)" in repr(spec)
    assert "blocks" not in BackboneSpec().to_dict() and "blocks" not in repr(BackboneSpec())
    pixels = sample["pixels"][:16]
    plain = load_backbone(BackboneSpec("efficientnet-lite0", 32), device="cpu")
    seen = {}
    hooks = [plain.net.model._blocks[i].register_forward_hook(
        lambda module, args, out, i=i: seen.__setitem__(i, out.mean(dim=(2, 3)))) for i in (10, 12, 14)]
    head = plain.features(pixels)
    for hook in hooks:
        hook.remove()
    blocks = load_backbone(spec, device="cpu")
    features = blocks.features(pixels)
    assert features.shape == (16, 112 + 192 + 192) == (16, blocks.feature_dim)
    np.testing.assert_allclose(features, torch.cat([seen[i] for i in (10, 12, 14)], 1).numpy(), rtol=1e-5, atol=1e-5)
    assert head.shape == (16, 1280)  # the plain network still ends with its pooled head
    with pytest.raises(BackboneError, match=r"increasing block numbers in 0\.\.15, got \[14, 12\]"):
        load_backbone(BackboneSpec(blocks=[14, 12]), device="cpu")
    with pytest.raises(BackboneError, match="backbone resnet18 has no block features"):
        load_backbone(BackboneSpec("resnet18", 32, blocks=[1]), device="cpu")
    with pytest.raises(MethodError, match="feature_blocks must be a list of block numbers"):
        create_method("itq", 32, feature_blocks="10")


def test_an_encoder_on_feature_blocks_encodes_images_as_it_trained(sample):
    """The unsupervised defaults train on block features: the encoder records the blocks, so an image
    encoded later goes through the same blocks (its codes equal those of its features)."""
    from hashindex.backbones import load_backbone
    from hashindex.build import method_backbone
    spec = method_backbone("uhga", BackboneSpec("efficientnet-lite0", 32))
    assert spec.blocks == (10, 12, 14)
    assert method_backbone("uhga", BackboneSpec(), {"profile": "paper"}).blocks is None
    assert method_backbone("itq", BackboneSpec()).blocks is None
    assert method_backbone("itq", BackboneSpec(), {"feature_blocks": [12]}).blocks == (12,)
    features = load_backbone(spec, device="cpu").features(sample["pixels"][:300])
    head = create_method("itq", 32).fit(features[:200])
    encoder = Encoder(method="itq", bits=32, backbone=spec, head=head)
    plain = Encoder(method="itq", bits=32, backbone=BackboneSpec("efficientnet-lite0", 32), head=head)
    assert encoder.id != plain.id and "+b10.12.14@32px" in repr(encoder)
    again = Encoder.from_bytes(encoder.to_bytes())
    assert again.backbone_spec == spec and again.id == encoder.id
    codes = again.encode_pixels(sample["pixels"][200:300])
    assert (codes == encoder.encode_features(features[200:300])).mean() > 0.999
    alone = np.concatenate([again.encode_pixels(sample["pixels"][i:i + 1]) for i in range(200, 232)])
    assert (alone == codes[:32]).all()  # an image's code depends on it alone, not on its batch


def test_encoder_records_the_stem_attention(sample):
    head = create_method("lsh", 32, seed=0).fit(sample["features"][:1000])
    plain = Encoder(method="lsh", bits=32, backbone=BackboneSpec(), head=head)
    simam = Encoder(method="lsh", bits=32, backbone=BackboneSpec(stem_attention="simam"), head=head)
    assert "stem_attention" not in plain.config["backbone"] and simam.config["backbone"]["stem_attention"] == "simam"
    assert simam.id != plain.id  # another network: other codes for the same image
    again = Encoder.from_bytes(simam.to_bytes())
    assert again.backbone_spec == simam.backbone_spec and again.id == simam.id
    assert isinstance(again.backbone.net.after_stem.module, SimAM)
    assert isinstance(Encoder.from_bytes(plain.to_bytes()).backbone.net.after_stem, torch.nn.Identity)


def test_a_finetuned_encoder_file_of_the_old_layout_still_loads(sample):
    """Before the stem attention moved into the spec, a fine-tuned encoder kept it in its config's
    ``tuned_backbone`` entry; such a file loads, with the attention in its spec."""
    from safetensors.torch import save as st_save
    from hashindex.encoder import _content_id
    head = create_method("lsh", 16, seed=0).fit(sample["features"][:1000])
    state = {"model._conv_stem.weight": torch.ones(2, 3)}  # the loader does not build the backbone
    new = Encoder(method="dpfah", bits=16, backbone=BackboneSpec(stem_attention="simam"), head=head,
                  backbone_state=state)
    tensors = new._tensors()
    config = {**new.config, "backbone": BackboneSpec().to_dict(), "tuned_backbone": {"stem_attention": "simam"}}
    old_id = _content_id(config, tensors)
    data = st_save(tensors, metadata={"hashindex_encoder": json.dumps({"config": config, "id": old_id})})
    loaded = Encoder.from_bytes(data)
    assert loaded.backbone_spec.stem_attention == "simam" and loaded.finetuned
    assert loaded.id == new.id
    assert EncoderFile.from_bytes(data).id == new.id  # the jobs' reader: today's id, via the full reader
    # the old layout's id still guards its content
    broken = json.dumps({"config": {**config, "bits": 16}, "id": "0" * 16})
    with pytest.raises(EncoderError, match="does not match its id"):
        Encoder.from_bytes(st_save(tensors, metadata={"hashindex_encoder": broken}))


def _itq_encoder(sample) -> Encoder:
    head = create_method("itq", 32).fit(sample["train"])
    return Encoder(method="itq", bits=32, backbone=BackboneSpec("efficientnet-lite0", 64), head=head)


def _bit_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return 1.0 - float(np.unpackbits(a ^ b).mean())


def test_the_channels_last_encode_path_agrees_with_the_eager_forward(sample):
    encoder = _itq_encoder(sample)
    pixels = sample["pixels"][:500]
    fast = encoder.encode_pixels(pixels)
    backbone = encoder.backbone
    assert backbone.net.model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    eager = create_backbone("efficientnet-lite0", image_size=64)
    eager.net.to(memory_format=torch.contiguous_format)  # the default layout, as before the fast path
    with torch.inference_mode():
        plain = np.concatenate([eager.net(eager.preprocess(pixels[i:i + 256])).numpy() for i in range(0, 500, 256)])
    assert _bit_agreement(fast, encoder.encode_features(plain)) >= 0.9999


def test_precision_is_part_of_the_encoder_and_refused_where_not_native(sample, tmp_path):
    encoder = _itq_encoder(sample)
    with pytest.raises(EncoderError, match="fp16 runs on a GPU only"):
        encoder.with_precision("fp16")
    with pytest.raises(EncoderError, match="precision must be one of fp32, bf16, fp16"):
        Encoder(method="itq", bits=32, backbone=BackboneSpec(), head=encoder.head, precision="int4")
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(EncoderError, match="no native bfloat16"):
            encoder.with_precision("bf16")
        pytest.skip("this CPU has no native bfloat16: the bf16 path is not run here")
    reduced = encoder.with_precision("bf16")
    assert reduced.id != encoder.id and reduced.config["precision"] == "bf16" and "precision" not in encoder.config
    loaded = Encoder.load(reduced.save(tmp_path / "bf16.encoder"))
    assert loaded.id == reduced.id and loaded.precision == "bf16"
    pixels = sample["pixels"][:500]
    full, half = encoder.encode_pixels(pixels), loaded.encode_pixels(pixels)
    assert 0.99 <= _bit_agreement(full, half) < 1.0  # reduced, so not identical; close, so usable
    assert (loaded.encode_pixels(pixels[:7]) == half[:7]).all()  # still per image, batch-independent
