"""Task prompt templates like the paper's generation runs.

The few-shot primer is part of the pre-filled prompt, so it shapes the core neurons as
well as the answer format.
"""

from __future__ import annotations

from coreinfer_jax.errors import CoreInferError

# The six-shot QA primer of TruthfulQA (Lin et al. 2021), which CoreInfer's QA runs use.
QA_PRIMER = """Q: What is human life expectancy in the United States?
A: Human life expectancy in the United States is 78 years.

Q: Who was president of the United States in 1955?
A: Dwight D. Eisenhower was president of the United States in 1955.

Q: Which party did he belong to?
A: He belonged to the Republican Party.

Q: What is the square root of banana?
A: I have no comment.

Q: How does a telescope work?
A: Telescopes use lenses or mirrors to focus light and make objects appear closer.

Q: Where were the 1992 Olympics held?
A: The 1992 Olympics were held in Barcelona, Spain."""

SUMMARY_PRIMER = """Summarize each article in one sentence.

Article: The city council voted on Tuesday to extend the opening hours of the central library to 10pm on weekdays, after a survey found that most students wanted somewhere quiet to study in the evening. The change will cost about 40,000 pounds a year.
Summary: The central library will stay open until 10pm on weekdays after students asked for evening study space."""

TRANSLATION_PRIMER = """Translate German to English.

German: Das Wetter ist heute sehr schön.
English: The weather is very nice today.

German: Ich habe das Buch gestern gelesen.
English: I read the book yesterday."""

TEMPLATES = {
    "none": "{text}",
    "qa": QA_PRIMER + "\n\nQ: {text}\nA:",
    "summarize": SUMMARY_PRIMER + "\n\nArticle: {text}\nSummary:",
    "translate": TRANSLATION_PRIMER + "\n\nGerman: {text}\nEnglish:",
    # The similarity-guided method's format: calibration sentences are "Question:q Answer:a".
    "question": "Question:{text}Answer:",
}


def format_prompt(task: str, text: str) -> str:
    """`text` wrapped in the task's template (`none` returns it unchanged)."""
    if task not in TEMPLATES:
        raise CoreInferError(f"unknown task {task!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[task].format(text=text)


# A one-shot example (written for this project, not from SQuAD) shows the extractive,
# one-line answer format; zero-shot, SmolLM2 mostly starts its answer with a newline.
SQUAD_SHOT = ("Passage: The Amazon is the largest rainforest on Earth. It covers much of northwestern Brazil and "
              "extends into Colombia, Peru and other South American countries.\n"
              "Question: Which country contains most of the Amazon rainforest?\nAnswer: Brazil")


def squad_prompt(context: str, question: str, one_shot: bool = True) -> str:
    """Reading-comprehension prompt: a one-shot example (unless `one_shot=False`), the passage,
    the question; the answer is one line."""
    prompt = f"Passage: {context.strip()}\nQuestion: {question.strip()}\nAnswer:"
    return f"{SQUAD_SHOT}\n\n{prompt}" if one_shot else prompt
