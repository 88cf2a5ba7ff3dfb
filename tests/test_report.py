"""mcvqa report: one self-contained HTML file with the metrics, plots and a gallery of confident mistakes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mcvqa.report import question_type


@pytest.mark.parametrize(
    "question,kind",
    [
        ("이 사진에서 볼 수 없는 색은 무엇인가요?", "negation"),
        ("그림 속 도형의 색이 아닌 것은 무엇인가요?", "negation"),
        ("사진 속 사람은 몇 명인가요?", "count"),
        ("이 도형은 무슨 색인가요?", "colour"),
        ("간판에 적힌 글자는 무엇인가요?", "text"),
        ("식탁 위에 있는 음식은 무엇인가요?", "food"),
        ("이 사진은 어디에서 찍었나요?", "place"),
        ("이 사진에서 보이는 탈것은 무엇인가요?", "vehicle"),
        ("사진 속 강아지는 어떤 자세인가요?", "animal"),
        ("남자가 들고 있는 것은?", "person"),
        ("테이블 위의 물건은 무엇인가요?", "object"),
        ("오늘 날씨가 좋아 보이나요?", "other"),
    ],
)
def test_question_types(question: str, kind: str) -> None:
    assert question_type(question) == kind


def test_report_is_self_contained(cfg_factory, tiny_loaded, synth_data, tmp_path) -> None:
    from mcvqa.predict import build_scorer, predict
    from mcvqa.report import build_report

    scorer = build_scorer(cfg_factory(), model=tiny_loaded[0], processor=tiny_loaded[1])
    a = predict(cfg_factory(), synth_data / "test.csv", tmp_path / "a", scorer=scorer, progress=False, log=lambda s: None)
    b = predict(cfg_factory("tta.methods=[orders]"), synth_data / "test.csv", tmp_path / "b", scorer=scorer, progress=False, log=lambda s: None)
    out = build_report(a.probs, synth_data / "test_labels.csv", tmp_path / "report.html", compare=b.probs, top_mistakes=5)
    text = out.read_text(encoding="utf-8")
    for section in ("Accuracy", "confusion matrix", "letter distribution", "reliability", "Accuracy by question type", "Most confident mistakes", "A vs B"):
        assert section in text, section
    assert not re.search(r'(src|href)="https?://', text), "no network resources"
    assert text.count('src="data:image/png;base64,') == 3
    assert text.count('src="data:image/jpeg;base64,') >= 5  # the mistakes' photos, embedded
