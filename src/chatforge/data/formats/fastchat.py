"""FastChat / Vicuna / MT-bench evaluation files.

* ``fastchat-questions`` -> :class:`Prompt`. MT-bench and the newer Vicuna bench store
  ``turns`` (list of user turns); the 2023 Vicuna eval stores ``text``. The prompt is the
  *first* turn: MT-bench's second turn ("Rewrite your previous response ...") only makes
  sense after the model's own first answer, so it cannot be a fixed prompt. The later
  turns are kept in ``meta["next_turns"]`` (and a ``reference`` in ``meta["reference"]``)
  so a multi-turn evaluation can still play them.
* Recognised but not convertible (reading them raises a DataError that says why):
  answer files (``question_id, answer_id, text|choices``: answers without their question
  text), GPT-4 review files (scores that point at answers by id), judge prompt
  templates, and the model/reviewer/prompt metadata tables. Joining answers with their
  questions across files is deliberately not done implicitly.
"""

from __future__ import annotations

from typing import Any

from chatforge.data.formats.base import Bad, Format, not_this, with_id
from chatforge.data.records import Prompt, msg


def detect_questions(d: Any) -> float:
    if not isinstance(d, dict) or "question_id" not in d or "answer_id" in d or "review_id" in d:
        return 0.0
    if isinstance(d.get("turns"), list) or isinstance(d.get("text"), str):
        return 3.0
    return 0.0


def convert_questions(obj: Any, meta: dict) -> Prompt:
    if not isinstance(obj, dict) or "question_id" not in obj:
        raise not_this(obj, "question_id + turns|text")
    turns = obj.get("turns")
    if turns is None:
        turns = [obj.get("text")]
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise Bad("'turns' must be a non-empty list of strings")
    if not turns[0].strip():
        raise Bad("the first turn is empty")
    meta = with_id(meta, obj, "question_id")
    if isinstance(obj.get("category"), str):
        meta["category"] = obj["category"]
    if len(turns) > 1:
        meta["next_turns"] = turns[1:]
    if obj.get("reference"):
        meta["reference"] = obj["reference"]
    return Prompt([msg("user", turns[0])], meta)


def _unsupported(*keys: str):
    def detect(d: Any) -> float:
        return 3.0 if isinstance(d, dict) and all(k in d for k in keys) else 0.0

    return detect


def _never(obj: Any, meta: dict):  # pragma: no cover - unsupported formats are refused before converting
    raise Bad("unsupported format")


FORMATS = [
    Format("fastchat-questions", "prompt", detect_questions, convert_questions,
           "MT-bench / Vicuna questions: question_id + turns|text -> Prompt (first turn)"),
    Format("fastchat-answers", "none", _unsupported("question_id", "answer_id"), _never,
           "FastChat model/reference answers", unsupported=(
               "model answers keyed by question_id, without the question text; "
               "they cannot become records on their own (join with the question file is not supported)")),
    Format("fastchat-reviews", "none", _unsupported("review_id", "question_id"), _never,
           "FastChat GPT-4 reviews", unsupported=(
               "GPT-4 reviews that refer to two answers by id; the texts are in other files (not supported)")),
    Format("judge-prompts", "none", _unsupported("prompt_template"), _never,
           "judge prompt templates", unsupported="judge prompt templates, not conversation data"),
    Format("fastchat-metadata", "none", lambda d: max(_unsupported("model_id", "model_name")(d),
                                                      _unsupported("reviewer_id", "prompt_id")(d)), _never,
           "FastChat model/reviewer tables", unsupported="a metadata table (models or reviewers), not conversation data"),
]
