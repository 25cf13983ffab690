"""tracer.families.align.inputs: the processor, the shared image path, npz validation, embedded defaults. Offline and CPU-only."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from tracer.families.align import inputs as I
from tracer.errors import BadInputError


@pytest.fixture(scope="module")
def processor():
    return I.build_processor()


@pytest.fixture(scope="module")
def defaults(processor):
    return I.default_inputs(processor)


# --------------------------------------------------------------------------------------------------- processor


def test_default_vocab_file_is_uncased_bert():
    path = I.default_vocab_file()
    assert os.path.isfile(path) and path.endswith(os.path.join("model", "vocab.txt"))
    vocab = I.read_vocab(path)
    assert len(vocab) == 30522
    assert vocab["[PAD]"] == 0 and vocab["[CLS]"] == 101 and vocab["[SEP]"] == 102


def test_default_vocab_file_missing_package(monkeypatch):
    monkeypatch.setattr(I, "VOCAB_PACKAGE", "no_such_package_for_tracer_tests")
    with pytest.raises(BadInputError, match="no_such_package_for_tracer_tests"):
        I.default_vocab_file()


def test_processor_config(processor):
    ip, tok = processor.image_processor, processor.tokenizer
    assert type(processor).__name__ == "AlignProcessor"
    assert ip.do_resize and dict(ip.size) == {"height": 346, "width": 346}
    assert ip.do_center_crop and dict(ip.crop_size) == {"height": 289, "width": 289}
    assert ip.do_rescale and ip.rescale_factor == 1 / 127.5 and ip.rescale_offset is True
    assert ip.do_normalize is False and ip.include_top is False
    assert int(ip.resample) == int(Image.Resampling.BILINEAR)
    assert tok.model_max_length == 64 and len(tok) == 30522
    assert tok("A Photo of a CAT")["input_ids"] == [101, 1037, 6302, 1997, 1037, 4937, 102]  # lower-cased


def test_processor_other_sizes():
    p = I.build_processor(image_size=240, seq_length=32)
    assert dict(p.image_processor.crop_size) == {"height": 240, "width": 240}
    assert p.image_processor.size["height"] == int(240 * 346 / 289)
    assert p.tokenizer.model_max_length == 32
    inp = I.inputs_from_pil_images(I.default_images()[:1], ["a photo"], p, "test")
    assert inp.pixel_values_nhwc.shape == (1, 240, 240, 3) and inp.input_ids.shape == (1, 32)


def test_tokenizer_from_folder_and_bad_sources(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_bytes(open(I.default_vocab_file(), "rb").read())
    tok = I.build_tokenizer(str(folder), seq_length=64)
    assert len(tok) == 30522 and tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    with pytest.raises(BadInputError, match="no such file"):
        I.build_processor(str(tmp_path / "nope.txt"))
    notvocab = tmp_path / "words.txt"
    notvocab.write_text("a\nb\nc\n")
    with pytest.raises(BadInputError, match=r"lacks \[PAD\]"):
        I.build_processor(str(notvocab))


def test_save_and_reload_offline(processor, defaults, tmp_path):
    from transformers import AlignProcessor

    processor.save_pretrained(tmp_path)
    again = AlignProcessor.from_pretrained(str(tmp_path), local_files_only=True)
    ip, ip2 = processor.image_processor, again.image_processor
    for key in ("size", "crop_size", "do_center_crop", "rescale_factor", "rescale_offset", "do_normalize",
                "include_top", "resample"):
        assert getattr(ip2, key) == getattr(ip, key), key
    assert again.tokenizer.model_max_length == 64 and len(again.tokenizer) == 30522
    out = again(images=I.default_images(), text=list(I.DEFAULT_TEXTS), return_tensors="pt")
    assert torch.equal(out["pixel_values"], defaults.torch_pixel_values())
    for k, v in defaults.torch_text().items():
        assert torch.equal(out[k], v), k


# --------------------------------------------------------------------------------------------------- pixels


def test_rescale_matches_processor_for_every_byte(processor):
    ip = processor.image_processor
    byte = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    assert np.array_equal(I.rescale_like_processor(byte), ip.rescale(byte, ip.rescale_factor, offset=True))
    rng = np.random.default_rng(0)
    frac = rng.uniform(0, 255, size=(3, 8, 8))  # npz pixels need not be integers
    assert np.array_equal(I.rescale_like_processor(frac), ip.rescale(frac, ip.rescale_factor, offset=True))
    assert I.rescale_like_processor(np.array([0.0, 255.0])).tolist() == [-1.0, 1.0]


def test_torch_pixel_values_equal_processor_output(processor, defaults):
    images = I.default_images()
    ref = processor(images=images, return_tensors="pt")["pixel_values"]
    mine = defaults.torch_pixel_values()
    assert mine.dtype == torch.float32 and mine.shape == ref.shape == (3, 3, 289, 289)
    assert (mine - ref).abs().max().item() == 0.0
    # ... and it is the 0..255 crop Keras gets, rescaled.
    nhwc = torch.from_numpy(defaults.pixel_values_nhwc).permute(0, 3, 1, 2)
    assert torch.allclose(mine, nhwc / 127.5 - 1, atol=1e-6, rtol=0)
    assert mine.min() >= -1 and mine.max() <= 1


def test_image_files_same_pixels_as_processor(processor, tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    noise = rng.integers(0, 256, size=(310, 420, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    Image.fromarray(noise[..., 0]).save(tmp_path / "gray.jpg", quality=90)
    rgba = np.concatenate([noise[:200, :200], np.full((200, 200, 1), 128, np.uint8)], axis=-1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    paths = [str(tmp_path / n) for n in ("noise.png", "gray.jpg", "rgba.png")]
    inp = I.inputs_from_images_and_texts(paths, ["one", "two"], processor)
    assert inp.num_images == 3 and inp.num_texts == 2 and inp.source == "--image/--text"
    assert inp.pixel_values_nhwc.dtype == np.float32 and inp.pixel_values_nhwc.shape == (3, 289, 289, 3)
    ref = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    assert (inp.torch_pixel_values() - ref).abs().max().item() == 0.0


def test_crop_is_the_centre_of_the_resize(processor):
    # A 346x346 image is not resampled, so the crop must be rows/cols 28..316 exactly.
    arr = np.random.default_rng(2).integers(0, 256, size=(346, 346, 3), dtype=np.uint8)
    crop = I.crop_0_255([Image.fromarray(arr)], processor)
    assert np.array_equal(crop[0], arr[28:317, 28:317].astype(np.float32))


# --------------------------------------------------------------------------------------------------- text


def test_long_text_truncated_with_warning(processor, caplog):
    long_text = "the quick brown fox jumps over the lazy dog " * 12
    with caplog.at_level(logging.WARNING, logger="tracer.families.align.inputs"):
        inp = I.inputs_from_pil_images(I.default_images()[:1], ["short", long_text], processor, "test")
    warnings = [r for r in caplog.records if r.name == "tracer.families.align.inputs" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "truncated to 64 tokens" in msg and "text 1" in msg and "the quick brown fox" in msg
    assert inp.input_ids.shape == (2, 64) and inp.input_ids.dtype == np.int64
    assert inp.input_ids[1, -1] == 102 and inp.attention_mask[1].all()
    assert inp.input_ids[0, :3].tolist() == [101, 2460, 102] and inp.attention_mask[0].sum() == 3
    assert not inp.token_type_ids.any()


def test_text_tensors(defaults):
    t = defaults.torch_text()
    assert set(t) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(v.dtype == torch.int64 and v.shape == (3, 64) for v in t.values())
    assert all(v.dtype == np.int32 for v in defaults.numpy_text().values())


def test_bad_text_and_empty_lists(processor):
    with pytest.raises(BadInputError, match="not a string"):
        I.inputs_from_pil_images(I.default_images()[:1], ["ok", 3], processor, "test")
    with pytest.raises(BadInputError, match="at least one image"):
        I.inputs_from_images_and_texts([], ["a"], processor)
    with pytest.raises(BadInputError, match="at least one image and one text"):
        I.inputs_from_pil_images(I.default_images()[:1], [], processor, "test")


# --------------------------------------------------------------------------------------------------- image files


def test_missing_and_unreadable_images(processor, tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(BadInputError, match="missing.png.*no such file") as e:
        I.inputs_from_images_and_texts([str(missing)], ["a"], processor)
    assert e.value.exit_code == 2
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    with pytest.raises(BadInputError, match="notes.png.*not a readable image"):
        I.inputs_from_images_and_texts([str(fake)], ["a"], processor)
    with pytest.raises(BadInputError, match="is a folder"):
        I.inputs_from_images_and_texts([str(tmp_path)], ["a"], processor)
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 77).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(BadInputError, match="cut.png.*cannot be decoded"):
        I.inputs_from_images_and_texts([str(good), str(cut)], ["a"], processor)


# --------------------------------------------------------------------------------------------------- npz


def _good_arrays(n=2, m=3):
    rng = np.random.default_rng(3)
    ids = np.zeros((m, 64), np.int64)
    ids[:, :4] = [101, 1037, 4937, 102]
    mask = (ids != 0).astype(np.int64)
    return {
        "pixel_values": rng.uniform(0, 255, size=(n, 289, 289, 3)).astype(np.float32),
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": np.zeros_like(ids),
    }


def _save(tmp_path, arrays, name="in.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_exact_arrays(tmp_path):
    arrays = _good_arrays()
    arrays["texts"] = np.array(["a cat", "b", "c"])
    inp = I.inputs_from_npz(_save(tmp_path, arrays))
    assert np.array_equal(inp.pixel_values_nhwc, arrays["pixel_values"])
    assert np.array_equal(inp.input_ids, arrays["input_ids"]) and inp.input_ids.dtype == np.int64
    assert inp.num_images == 2 and inp.num_texts == 3 and inp.texts == ["a cat", "b", "c"]
    assert inp.source.startswith("npz:")
    # uint8 / int32 inputs are accepted and widened
    arrays = _good_arrays()
    arrays["pixel_values"] = arrays["pixel_values"].astype(np.uint8)
    arrays["input_ids"] = arrays["input_ids"].astype(np.int32)
    inp = I.inputs_from_npz(_save(tmp_path, arrays))
    assert inp.pixel_values_nhwc.dtype == np.float32 and inp.input_ids.dtype == np.int64


def test_npz_token_type_ids_default_to_zeros(tmp_path, caplog):
    arrays = _good_arrays()
    del arrays["token_type_ids"]
    with caplog.at_level(logging.INFO, logger="tracer.families.align.inputs"):
        inp = I.inputs_from_npz(_save(tmp_path, arrays))
    assert inp.token_type_ids.shape == (3, 64) and not inp.token_type_ids.any()
    assert any("token_type_ids" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def _set(key, value):
    def mutate(a):
        a[key] = value(a) if callable(value) else value
    return mutate


def _drop(key):
    def mutate(a):
        del a[key]
    return mutate


def _poke(key, index, value):
    def mutate(a):
        arr = a[key].copy()
        arr[index] = value
        a[key] = arr
    return mutate


NPZ_CASES = {
    "missing pixel_values": (_drop("pixel_values"), ["pixel_values", "missing"]),
    "missing attention_mask": (_drop("attention_mask"), ["attention_mask", "missing"]),
    "unknown key": (_set("token_type_id", np.zeros((3, 64), np.int64)), ["token_type_id", "unknown"]),
    "NCHW": (_set("pixel_values", lambda a: a["pixel_values"].transpose(0, 3, 1, 2)),
             ["pixel_values", "(N, 289, 289, 3)", "(2, 3, 289, 289)", "NCHW"]),
    "wrong size": (_set("pixel_values", np.zeros((2, 224, 224, 3), np.float32)),
                   ["pixel_values", "(N, 289, 289, 3)", "(2, 224, 224, 3)"]),
    "3-D pixels": (_set("pixel_values", np.zeros((289, 289, 3), np.float32)), ["pixel_values", "4-D", "3-D"]),
    "pixels > 255": (_poke("pixel_values", (0, 0, 0, 0), 256.0), ["pixel_values", "0..255", "256"]),
    "pixels in [-1,1]": (_set("pixel_values", lambda a: a["pixel_values"] / 127.5 - 1),
                         ["pixel_values", "0..255", "[-1, 1]"]),
    "NaN pixel": (_poke("pixel_values", (1, 5, 5, 2), np.nan), ["pixel_values", "finite", "1 non-finite"]),
    "inf pixel": (_poke("pixel_values", (0, 1, 1, 1), np.inf), ["pixel_values", "finite"]),
    "bool pixels": (_set("pixel_values", np.ones((1, 289, 289, 3), bool)), ["pixel_values", "dtype bool"]),
    "float input_ids": (_set("input_ids", lambda a: a["input_ids"].astype(np.float32)),
                        ["input_ids", "integer", "float32"]),
    "seq length 32": (_set("input_ids", np.zeros((3, 32), np.int64)), ["input_ids", "(3, 64)", "(3, 32)"]),
    "1-D input_ids": (_set("input_ids", np.zeros((64,), np.int64)), ["input_ids", "2-D", "(64,)"]),
    "mask shape": (_set("attention_mask", np.ones((2, 64), np.int64)), ["attention_mask", "(3, 64)", "(2, 64)"]),
    "mask value 2": (_poke("attention_mask", (0, 0), 2), ["attention_mask", "0/1", "2"]),
    "negative id": (_poke("input_ids", (0, 5), -1), ["input_ids", "non-negative", "-1"]),
    "types shape": (_set("token_type_ids", np.zeros((3, 63), np.int64)), ["token_type_ids", "(3, 64)", "(3, 63)"]),
    "texts count": (_set("texts", np.array(["only one"])), ["texts", "3 strings", "(1,)"]),
    "no images": (_set("pixel_values", np.zeros((0, 289, 289, 3), np.float32)), ["pixel_values", "at least one"]),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_npz_rejects(tmp_path, case):
    mutate, needles = NPZ_CASES[case]
    arrays = _good_arrays()
    mutate(arrays)
    with pytest.raises(BadInputError) as e:
        I.inputs_from_npz(_save(tmp_path, arrays))
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))
    assert e.value.exit_code == 2


def test_npz_vocab_limits(tmp_path):
    arrays = _good_arrays()
    path = _save(tmp_path, arrays)
    with pytest.raises(BadInputError, match=r"input_ids.*< vocab size 1000.*maximum 4937"):
        I.inputs_from_npz(path, vocab_size=1000)
    arrays["token_type_ids"][0, 0] = 2
    with pytest.raises(BadInputError, match=r"token_type_ids.*< type vocab size 2.*maximum 2"):
        I.inputs_from_npz(_save(tmp_path, arrays, "t.npz"), type_vocab_size=2)


def test_npz_file_errors(tmp_path):
    with pytest.raises(BadInputError, match="no such file"):
        I.inputs_from_npz(str(tmp_path / "absent.npz"))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(BadInputError, match="junk.npz.*cannot be read"):
        I.inputs_from_npz(str(junk))
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((1, 289, 289, 3), np.float32))
    with pytest.raises(BadInputError, match="single array"):
        I.inputs_from_npz(str(single))


def test_npz_unit_range_pixels_warn(tmp_path, caplog):
    arrays = _good_arrays()
    arrays["pixel_values"] = arrays["pixel_values"] / 255.0
    with caplog.at_level(logging.WARNING, logger="tracer.families.align.inputs"):
        I.inputs_from_npz(_save(tmp_path, arrays))
    assert any("[0, 1]" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------------- defaults


def test_defaults_deterministic_and_distinct(processor, defaults):
    again = I.default_inputs(processor)
    assert np.array_equal(again.pixel_values_nhwc, defaults.pixel_values_nhwc)
    assert np.array_equal(again.input_ids, defaults.input_ids)
    assert defaults.source == "defaults" and defaults.texts == list(I.DEFAULT_TEXTS)
    assert defaults.pixel_values_nhwc.shape == (3, 289, 289, 3) and defaults.input_ids.shape == (3, 64)
    px = defaults.pixel_values_nhwc
    assert px.min() >= 0 and px.max() <= 255 and np.array_equal(px, np.round(px))
    for i in range(3):
        assert px[i].std() > 20  # not flat
        for j in range(i + 1, 3):
            assert np.abs(px[i] - px[j]).mean() > 30
    assert [im.size for im in I.default_images()] == [(400, 300), (300, 400), (448, 336)]
    assert len({tuple(r) for r in defaults.input_ids.tolist()}) == 3
