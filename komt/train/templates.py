"""Korean instruction templates for the multi-task builder, several per task type.

The komt paper builds its Korean instruction data FLAN-style (Wei et al. 2022, "Finetuned Language
Models Are Zero-Shot Learners"): each supervised example is phrased with one of several hand-written
instruction templates, so the model learns the task rather than one wording. Templates are
`str.format` strings; the placeholders each task fills are listed in `FIELDS`.

Translation templates need a Korean particle after a language name ("영어로" but "중국말로", "영문으로"),
which depends on whether the name's last syllable ends in a consonant; `with_ro` picks it.
"""

from __future__ import annotations

QA = [
    "다음 글을 읽고 질문에 답하세요.\n\n글: {context}\n\n질문: {question}",
    "{context}\n\n위 글을 바탕으로 다음 질문에 답하세요: {question}",
    "주어진 지문에서 질문의 답을 찾아 짧게 답하세요.\n\n지문:\n{context}\n\n질문: {question}",
    "질문: {question}\n\n다음 내용을 참고하여 답하세요.\n{context}",
    "아래 문단을 읽고 \"{question}\"에 대한 답을 문단에서 찾아 쓰세요.\n\n{context}",
]

CLASSIFICATION = [
    "다음 글을 읽고 알맞은 분류를 고르세요.\n선택지: {options}\n\n{text}",
    "{text}\n\n위 글은 다음 중 어디에 해당하나요? ({options})",
    "다음 문장을 {options} 중 하나로 분류하세요.\n\n문장: {text}",
    "글: {text}\n\n이 글에 알맞은 분류를 선택지에서 하나만 고르세요.\n선택지: {options}",
]

NLI = [
    "전제: {premise}\n가설: {hypothesis}\n\n전제가 사실이라면 가설은 어떤가요? 선택지: {options}",
    "다음 두 문장의 관계를 판단하세요. 선택지: {options}\n\n문장 1: {premise}\n문장 2: {hypothesis}",
    "\"{premise}\"라는 문장이 사실일 때, \"{hypothesis}\"라는 문장은 {options} 중 무엇인가요?",
    "{premise}\n\n위 문장에 비추어 볼 때 다음 문장은 어떤가요? ({options})\n{hypothesis}",
]

SUMMARIZATION = [
    "다음 글을 요약하세요.\n\n{document}",
    "{document}\n\n위 글의 핵심 내용을 간단히 요약해 주세요.",
    "아래 기사를 몇 문장으로 요약하세요.\n\n{document}",
    "다음 문서의 요약문을 작성하세요.\n\n문서: {document}",
]

TRANSLATION = [
    "다음 {src_lang} 문장을 {tgt_lang_ro} 번역하세요.\n\n{source}",
    "{source}\n\n위 {src_lang} 문장을 {tgt_lang_ro} 옮겨 주세요.",
    "{src_lang} 원문: {source}\n\n{tgt_lang} 번역:",
    "아래 글을 {tgt_lang_ro} 자연스럽게 번역하세요.\n\n{source}",
]

# Task kind -> its instruction templates.
TEMPLATES = {
    "qa": QA,
    "cls": CLASSIFICATION,
    "nli": NLI,
    "sum": SUMMARIZATION,
    "mt": TRANSLATION,
}
# Task kind -> the placeholders its templates may use (a user template naming another is refused).
FIELDS = {
    "qa": {"context", "question"},
    "cls": {"text", "options"},
    "nli": {"premise", "hypothesis", "options"},
    "sum": {"document"},
    "mt": {"source", "src_lang", "tgt_lang", "tgt_lang_ro"},
}

# NLI label names: KorNLI / SNLI strings and the 0/1/2 ids of the Hugging Face datasets.
NLI_LABELS = {
    "entailment": "참",
    "neutral": "중립",
    "contradiction": "거짓",
    "0": "참",
    "1": "중립",
    "2": "거짓",
}

LANGUAGE_NAMES = {
    "ko": "한국어",
    "en": "영어",
    "ja": "일본어",
    "zh": "중국어",
    "fr": "프랑스어",
    "de": "독일어",
    "es": "스페인어",
    "ru": "러시아어",
    "vi": "베트남어",
}


def language_name(code_or_name: str) -> str:
    """"en" -> "영어"; anything not a known code is taken as the name itself ("스와힐리어")."""
    return LANGUAGE_NAMES.get(code_or_name.lower(), code_or_name)


def with_ro(word: str) -> str:
    """Append the particle 로/으로: "영어" -> "영어로", "영문" -> "영문으로", "말" -> "말로".

    A Hangul syllable is 0xAC00 + (initial * 21 + vowel) * 28 + final; final 0 is no consonant and
    final 8 is ㄹ, the two cases that take 로.
    """
    last = word[-1:] or " "
    if "가" <= last <= "힣":
        final = (ord(last) - 0xAC00) % 28
        return word + ("로" if final in (0, 8) else "으로")
    return word + "(으)로"
