"""Language match: detection on hand-written texts, the filter function, the reward."""

import pytest

from posttrain.reward.language import LanguageMatchReward, detect_language, language_matches

TEXTS = {
    "en": "What is the capital of France, and why is it important for the history of the country?",
    "fr": "Quelle est la capitale de la France et pourquoi est-elle si importante dans son histoire ?",
    "de": "Was ist die Hauptstadt von Frankreich und warum ist sie für die Geschichte so wichtig?",
    "es": "¿Cuál es la capital de Francia y por qué es tan importante para la historia del país?",
    "it": "Qual è la capitale della Francia e perché è così importante per la storia del paese?",
    "pt": "Qual é a capital da França e por que ela é tão importante para a história do país?",
    "nl": "Wat is de hoofdstad van Frankrijk en waarom is het zo belangrijk voor de geschiedenis?",
    "cyrillic": "Какая столица Франции и почему она так важна для истории страны?",
    "ja": "フランスの首都はどこですか、そしてなぜ歴史的に重要なのですか?",
    "ko": "프랑스의 수도는 어디이며 왜 역사적으로 중요한가요? 설명해 주세요.",
    "han": "法国的首都是哪里，为什么它在这个国家的历史上如此重要？",
    "arabic": "ما هي عاصمة فرنسا ولماذا هي مهمة جدا في تاريخ البلاد؟",
    "greek": "Ποια είναι η πρωτεύουσα της Γαλλίας και γιατί είναι σημαντική;",
}


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_detect_language(lang):
    assert detect_language(TEXTS[lang]) == lang


def test_too_short_or_ambiguous_is_unknown():
    assert detect_language("OK") is None
    assert detect_language("1234 5678 + 99 = ?") is None
    assert detect_language("Paris London Berlin Madrid Roma") is None  # no stopwords


def test_code_blocks_do_not_decide_the_language():
    response = ("Voici la solution : on parcourt la liste et on garde le maximum.\n"
                "```python\ndef the_max(items):\n    return max(items) if items is not None else None\n```")
    assert detect_language(response) == "fr"


def test_language_matches():
    assert language_matches(TEXTS["fr"], "La capitale de la France est Paris, et elle est le centre du pays.") is True
    assert language_matches(TEXTS["fr"], "The capital of France is Paris, and it is the centre of the country.") is False
    assert language_matches(TEXTS["cyrillic"], "Столица Франции — Париж, это очень важный город.") is True
    assert language_matches(TEXTS["ja"], TEXTS["han"]) is False
    assert language_matches("OK?", "anything") is None
    assert language_matches(TEXTS["de"], "?!") is False  # known prompt, unknowable answer


def test_reward_uses_last_user_message_and_abstains():
    reward = LanguageMatchReward()
    prompts = [
        [{"role": "system", "content": "You are a helpful assistant that answers questions."},
         {"role": "user", "content": TEXTS["es"]}],
        [{"role": "user", "content": TEXTS["en"]}],
        [{"role": "user", "content": "2+2?"}],
    ]
    responses = ["La capital de Francia es París, que es el centro político del país.",
                 "La capitale de la France est Paris, et elle est le centre du pays.",
                 "4"]
    assert reward.score(prompts, responses) == [1.0, 0.0, None]
