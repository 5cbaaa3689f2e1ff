"""The /live page in a real browser (#26 must-show): Debian's chromium, headless, driven by
Selenium through chromedriver, its microphone faked with the generated conversation
(`--use-file-for-fake-audio-capture`). The page must show one row per spoken utterance, each
within 0.2 s of the truth, with the label `dmf predict --transcript` gives offline for the samples
the page sent.

The page takes the texts from `?transcript=` (sent as each utterance starts) and, with that, stops
after as many utterances as texts: Chromium's fake capture loops its file. `?record=1` keeps the
PCM the page sent (window.dmfLive.recording()), so the offline prediction scores the very same
samples; the page's stream starts a little into the file, found by cross-correlation.

Skipped where chromium or chromedriver is missing (Debian: `apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.parse

import numpy as np
import pytest
import soundfile as sf

selenium = pytest.importorskip("selenium", reason="the page test drives chromium with selenium (the dev extra)")
pytest.importorskip("websockets", reason="/v1/stream needs the serve extra's websockets")
pytest.importorskip("webrtcvad", reason="live sessions need webrtcvad (the serve or live extra)")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("needs Debian's chromium and chromedriver: apt-get install -y chromium chromium-driver",
                allow_module_level=True)

from conftest_runtime import free_port, predictor, rt  # noqa: E402,F401 (fixtures)
from test_conversation import _invoke  # noqa: E402
from test_stream import RATE, check_against_truth, conversation_fixture  # noqa: E402
from test_server import _start_server, _stop  # noqa: E402


@pytest.fixture(scope="module")
def browser(conversation):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={conversation.wav}", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # Service(path): no driver download
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def conversation(tmp_path_factory):
    return conversation_fixture(tmp_path_factory)


def _offset(sent: np.ndarray, recording: np.ndarray) -> int:
    """Where `sent` starts in `recording` (samples), by FFT cross-correlation of the first 5 s."""
    a = sent[:5 * RATE].astype(np.float64)
    b = recording.astype(np.float64)
    n = 1 << int(np.ceil(np.log2(len(a) + len(b))))
    corr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[:len(b)]
    return int(np.argmax(corr))


def _vtt(events: list[dict]) -> str:
    def ts(s: float) -> str:
        ms = int(round(s * 1000))
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
    return "WEBVTT\n\n" + "\n".join(f"{ts(e['start_s'])} --> {ts(e['end_s'])}\n{e['text']}\n" for e in events)


@pytest.mark.parametrize("rate", ["16k", "native"])
def test_the_page_shows_each_utterance_with_its_offline_label(rt, predictor, browser, conversation, tmp_path, rate):
    """rate: the page's 16 kHz audio context (the browser resamples), or the device's own rate
    (`?native_rate=1`: the worklet's own downsampler, for browsers that refuse a 16 kHz context)."""
    from selenium.webdriver.common.by import By

    port = free_port()
    proc = _start_server(rt.artifact, port)
    try:
        query = {"record": 1, "transcript": json.dumps(conversation.texts)}
        query = urllib.parse.urlencode({**query, **({"native_rate": 1} if rate == "native" else {})})
        browser.get(f"http://127.0.0.1:{port}/live?{query}")
        browser.find_element(By.ID, "start").click()
        deadline = time.monotonic() + len(conversation.pcm) / RATE + 30
        while time.monotonic() < deadline and not browser.execute_script("return window.dmfLive.closed"):
            time.sleep(0.25)
        live = browser.execute_script("return window.dmfLive")
        sent = np.frombuffer(base64.b64decode(browser.execute_script("return window.dmfLive.recording()")), "<i2")
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#timeline .utt[data-label]')].reverse()"
            ".map(li => [li.dataset.label, li.querySelector('.text input').value])")
    finally:
        _stop(proc)
    assert live["closed"] == {"code": 1000, "reason": "page stopped"}, (live["closed"], live["events"][-3:])
    assert (live["rate"] == RATE) == (rate == "16k"), live["rate"]  # which path ran
    events = live["events"]
    utterances = [e for e in events if e["type"] == "utterance"]
    assert rows == [[e["label"], e["text"]] for e in utterances]  # what the page shows: one row each
    offset = _offset(sent, conversation.pcm)
    assert offset < RATE  # the page started sending within a second of the file's start
    # the same utterances as the truth, and Predictor.predict on the samples the page sent agrees
    check_against_truth(events, conversation, predictor, pcm=sent, offset_s=offset / RATE)
    # ...as does `dmf predict --transcript` on a recording of those samples, cut where the page's events say
    sf.write(tmp_path / "sent.wav", sent, RATE, subtype="PCM_16")
    (tmp_path / "sent.vtt").write_text(_vtt(utterances), encoding="utf-8")
    code, output = _invoke("predict", rt.artifact, "--audio", tmp_path / "sent.wav", "--transcript",
                           tmp_path / "sent.vtt", "--out", tmp_path / "turns.jsonl", "--threads", 1, "--no-progress")
    assert code == 0, output
    offline = [json.loads(line)["label"] for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert [label for label, _ in rows] == offline
