"""Visualisations: files are written, reopened and checked; Captum's plotting functions take our arrays."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from captum.attr import visualization as cviz  # noqa: E402
from PIL import Image  # noqa: E402

from lime_attr import visualize as viz  # noqa: E402
from lime_attr.attribution.modality import ModalityAttribution  # noqa: E402
from lime_attr.canonizers import available_canonizers  # noqa: E402
from lime_attr.models.architectures import build_model  # noqa: E402
from lime_attr.models.processing import (NUM_AUDIO_FRAMES, NUM_IMAGE_TOKENS,  # noqa: E402
                                         build_digits_processor, build_tones_processor, description_question,
                                         existence_question, format_prompt)
from lime_attr.models.scenes import CANVAS_SIZE as S  # noqa: E402

pytestmark = pytest.mark.skipif(not {"llava", "qwen2_audio"} <= set(available_canonizers()),
                                reason="llava / qwen2_audio canonizers not registered yet")


@pytest.fixture(scope="module")
def image_result():
    proc = build_digits_processor()
    model = build_model("digits-llava", proc.tokenizer, seed=0).eval()
    img = (np.random.default_rng(0).random((S, S, 3)) * 255).astype("uint8")
    enc = proc(images=[img], text=[format_prompt("digits-llava", existence_question("digits-llava", "7"))],
               return_tensors="pt")
    return ModalityAttribution(model, proc).attribute(enc), proc


@pytest.fixture(scope="module")
def audio_result():
    proc = build_tones_processor()
    model = build_model("tones-qwen2audio", proc.tokenizer, seed=0).eval()
    wave = np.random.default_rng(1).standard_normal(32000).astype("float32") * 0.1
    enc = proc(audio=[wave], text=[format_prompt("tones-qwen2audio", description_question("tones-qwen2audio"))],
               return_tensors="pt", sampling_rate=16000)
    return ModalityAttribution(model, proc).attribute(enc), wave


def _check_png(path, min_side=50):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert min(arr.shape[:2]) >= min_side
    assert arr.std() > 1.0  # not a blank canvas


def test_image_overlay_png(image_result, tmp_path):
    res, _ = image_result
    hm = res.heatmaps[0][0]
    fig = viz.image_overlay(hm, tmp_path / "overlay.png")
    _check_png(tmp_path / "overlay.png")
    fig = viz.image_overlay(hm, tmp_path / "patches.png", level="patches")
    _check_png(tmp_path / "patches.png")
    # Captum's layout in: an [H, W, C] attribution array
    attr, img = viz.image_arrays(hm)
    fig = viz.image_overlay(attr, tmp_path / "from_array.png", image=img)
    _check_png(tmp_path / "from_array.png")


def test_captum_visualize_image_attr_on_our_arrays(image_result, tmp_path):
    res, _ = image_result
    attr, img = viz.image_arrays(res.heatmaps[0][0])
    assert attr.shape == (S, S, 1) and img.shape == (S, S, 3)
    np.testing.assert_allclose(attr.sum(), res.heatmaps[0][0].total, rtol=1e-6)
    for method in ("heat_map", "blended_heat_map"):
        fig, ax = cviz.visualize_image_attr(attr, img, method=method, sign="all", use_pyplot=False)
        fig.savefig(tmp_path / f"captum_{method}.png")
        _check_png(tmp_path / f"captum_{method}.png")


def test_audio_plot(audio_result, tmp_path):
    res, wave = audio_result
    hm = res.heatmaps[0][0]
    fig = viz.audio_plot(hm, tmp_path / "audio.png", waveform=wave)
    assert len(fig.axes) >= 3
    _check_png(tmp_path / "audio.png")
    fig = viz.audio_plot(hm, tmp_path / "audio_nowave.png")
    _check_png(tmp_path / "audio_nowave.png")
    attr, data, x = viz.audio_arrays(hm)
    assert attr.shape == data.shape == (NUM_AUDIO_FRAMES, 1) and x.shape == (NUM_AUDIO_FRAMES,)
    np.testing.assert_allclose(attr.sum(), hm.total, rtol=1e-6)
    with pytest.raises(ValueError):
        viz.audio_plot(image_result_hm_stub())


@pytest.mark.skipif(not hasattr(matplotlib.cm, "get_cmap"),
                    reason="captum 0.9's visualize_timeseries_attr calls matplotlib.cm.get_cmap, which matplotlib "
                           f"{matplotlib.__version__} removed (3.9+): it fails for any input")
def test_captum_visualize_timeseries_attr_on_our_arrays(audio_result, tmp_path):
    res, _ = audio_result
    attr, data, x = viz.audio_arrays(res.heatmaps[0][0])
    fig, _ = cviz.visualize_timeseries_attr(attr, data, x_values=x, method="overlay_individual", sign="all",
                                            use_pyplot=False)
    fig.savefig(tmp_path / "captum_ts.png")
    _check_png(tmp_path / "captum_ts.png")


def image_result_hm_stub():
    class H:
        kind = "image"
    return H()


def test_text_html_ansi_and_captum_record(image_result, tmp_path):
    res, proc = image_result
    html = viz.text_html(res, path=tmp_path / "tokens.html")
    text = (tmp_path / "tokens.html").read_text()
    assert html in text and "<span" in html and f"[image x{NUM_IMAGE_TOKENS}]" in html
    assert html.count("<span") == res.token_relevance.shape[1] - NUM_IMAGE_TOKENS + 1
    full = viz.text_html(res, collapse=False)
    assert full.count("<span") == res.token_relevance.shape[1]
    ansi = viz.text_ansi(res)
    assert "\x1b[48;2;" in ansi and ansi.count("\x1b[0m") == html.count("<span")
    rec = viz.visualization_record(res)
    assert isinstance(rec, cviz.VisualizationDataRecord)
    assert len(rec.raw_input_ids) == rec.word_attributions.shape[0]
    assert float(rec.word_attributions.abs().max()) == pytest.approx(1.0)
    # captum's own HTML formatter takes the record's fields (visualize_text itself needs IPython)
    cell = cviz.format_word_importances(rec.raw_input_ids, rec.word_attributions)
    assert cell.count("<mark") == len(rec.raw_input_ids)
    try:
        import IPython  # noqa: F401
    except ImportError:
        return
    out = cviz.visualize_text([rec])
    assert "image" in out.data
