"""Reader for the IEMOCAP release tree (docs/design.md, 'Evaluation protocol').

Layout (K = 1..5):
  SessionK/dialog/EmoEvaluation/<dialog>.txt   label lines "[s - e]\\t<utt>\\t<code>\\t[V, A, D]",
                                               then per-annotator lines ("C-E1:\\t...") that are not labels
  SessionK/dialog/transcriptions/<dialog>.txt  "<utt> [s-e]: text" (some lines have no utterance id)
  SessionK/sentences/wav/<dialog>/<utt>.wav
Classes: neu, hap (+ exc merged), sad, ang; every other code is dropped. On the release this gives
5531 utterances (1708 neu / 1636 hap / 1084 sad / 1103 ang).
"""

from __future__ import annotations

import re
from pathlib import Path

import soundfile as sf

from dmf.data.records import IEMOCAP_LABELS, Corpus, DataError, Utterance

CODE_MAP = {"neu": "neu", "hap": "hap", "exc": "hap", "sad": "sad", "ang": "ang"}

# "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]"
_LABEL_LINE = re.compile(r"^\[\s*[\d.]+\s*-\s*[\d.]+\s*\]\s+(Ses\d\d[FM]_\S+)\s+(\w+)\s+\[")
# "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me."
_TRANSCRIPT_LINE = re.compile(r"^(Ses\d\d[FM]_\S+)\s+\[[^\]]*\]:\s?(.*)$")
_SPEAKER = re.compile(r"^(Ses\d\d)[FM]_.*_([FM])[^_]*$")
MAX_LISTED = 5  # problems named in the one-line error; the count says how many in all


def read_labels(eval_file: Path) -> dict[str, str]:
    """Utterance id -> raw emotion code from one EmoEvaluation file (header and annotator lines skipped)."""
    codes = {}
    for line in eval_file.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LABEL_LINE.match(line.strip())
        if match:
            codes[match.group(1)] = match.group(2)
    return codes


def read_transcripts(trans_file: Path) -> dict[str, str]:
    """Utterance id -> transcript; lines without an utterance id are skipped."""
    texts = {}
    for line in trans_file.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _TRANSCRIPT_LINE.match(line.strip())
        if match:
            texts[match.group(1)] = match.group(2).strip()
    return texts


def speaker_of(utt_id: str) -> tuple[str, str]:
    """(session, speaker): 'Ses01F_impro01_M003' -> ('Ses01', 'Ses01M'). The speaker's gender is
    the letter of the LAST part; 'Ses01F' names the session's dialog, not the speaker."""
    match = _SPEAKER.match(utt_id)
    if not match:
        raise DataError(f"utterance id {utt_id!r} does not look like an IEMOCAP id (SesNN[FM]_..._[FM]NNN)")
    return match.group(1), match.group(1) + match.group(2)


def _audio_problem(wav: Path) -> str | None:
    if not wav.is_file():
        return f"{wav}: no wav file"
    try:
        sf.info(str(wav))  # any rate / channel count is fine: preprocessing resamples and down-mixes
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        return f"{wav}: unreadable audio ({str(exc).split(':')[-1].strip()})"
    return None


def _dialog_utterances(session_dir: Path, eval_file: Path, keep: dict[str, str],
                       problems: list[str]) -> list[Utterance]:
    """Labelled utterances of one dialog; missing transcripts or audio go to `problems`."""
    dialog = eval_file.stem
    texts = {}
    trans_file = session_dir / "dialog" / "transcriptions" / f"{dialog}.txt"
    if trans_file.is_file():
        texts = read_transcripts(trans_file)
    out = []
    for utt_id, code in read_labels(eval_file).items():
        label = keep.get(code)
        if label is None:
            continue
        wav = session_dir / "sentences" / "wav" / dialog / f"{utt_id}.wav"
        problem = _audio_problem(wav)
        if utt_id not in texts or not texts[utt_id]:
            problem = f"{utt_id}: no transcript line in {trans_file}"
        if problem:
            problems.append(problem)
            continue
        session, speaker = speaker_of(utt_id)
        out.append(Utterance(utt_id, wav, texts[utt_id], label, session, speaker))
    return out


def load_iemocap(root: str | Path, labels: tuple[str, ...] | None = None) -> Corpus:
    """All labelled utterances of the tree under `root`, sorted by id. `labels` keeps a subset of
    the four classes. Raises one DataError listing every labelled utterance without a transcript
    line or a readable wav."""
    root = Path(root)
    labels = tuple(labels) if labels else IEMOCAP_LABELS
    unknown = [label for label in labels if label not in IEMOCAP_LABELS]
    if unknown:
        raise DataError(f"{root}: IEMOCAP has no class {unknown[0]!r}: expected some of {IEMOCAP_LABELS}")
    keep = {code: label for code, label in CODE_MAP.items() if label in labels}
    sessions = sorted(p for p in root.glob("Session*") if p.is_dir())
    if not sessions:
        raise DataError(f"{root}: no Session* folders: not an IEMOCAP tree")
    utterances: list[Utterance] = []
    problems: list[str] = []
    for session_dir in sessions:
        for eval_file in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
            if eval_file.name.startswith("."):  # macOS "._" resource forks in some copies
                continue
            utterances.extend(_dialog_utterances(session_dir, eval_file, keep, problems))
    if problems:
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise DataError(f"{root}: {len(problems)} labelled utterance(s) unusable: {shown}{more}")
    if not utterances:
        raise DataError(f"{root}: no labelled utterances of classes {labels} found")
    utterances.sort(key=lambda u: u.id)
    return Corpus(utterances, labels)
