"""LLM-as-judge: pairwise comparisons through any OpenAI-compatible chat endpoint.

Stdlib only (urllib). Each pair is judged twice, once as (A=candidate, B=baseline) and once
swapped, because judges prefer a position (usually the first). A win counts only when
both orders agree; disagreeing verdicts count as a tie. Verdicts are parsed from the
judge's first line: ``A``, ``B`` or ``tie``.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from chatforge.errors import ChatforgeError

SYSTEM = (
    "You are a strict, impartial judge of AI assistant answers. You compare two answers to the same "
    "user request for helpfulness, correctness, harmlessness and fluency. Ignore answer length unless it "
    "hurts quality; a repetitive or unfinished answer is worse. Reply with exactly one word on the first "
    "line: A if answer A is better, B if answer B is better, tie if they are equally good or equally bad."
)

TEMPLATE = """[User request]
{prompt}

[Answer A]
{a}

[Answer B]
{b}

Which answer is better? Reply with one word: A, B or tie."""


class JudgeError(ChatforgeError):
    """The judge endpoint could not be reached or answered nonsense."""


def parse_verdict(text: str) -> str | None:
    """'A', 'B', 'tie' or None (unparseable) from the judge's reply."""
    for line in text.strip().splitlines():
        s = line.strip().strip("*#:.`'\"[]() ").lower()
        if not s:
            continue
        m = re.match(r"^(?:answer\s+|verdict:?\s*)?(a|b|tie|draw|equal)\b", s)
        if m:
            v = m.group(1)
            return v.upper() if v in ("a", "b") else "tie"
        return None
    return None


@dataclass
class Judge:
    """Pairwise judge on ``url`` (``.../v1`` or the full ``.../chat/completions``)."""

    url: str
    model: str
    timeout: float = 60.0
    retries: int = 2
    api_key: str | None = None
    calls: int = field(default=0, init=False)

    @property
    def endpoint(self) -> str:
        u = self.url.rstrip("/")
        if u.endswith("/chat/completions"):
            return u
        if not u.endswith("/v1"):
            u += "/v1"
        return u + "/chat/completions"

    def ask(self, prompt: str, a: str, b: str) -> str | None:
        """One verdict (A/B/tie/None) for answers in this order."""
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 8,
            "messages": [{"role": "system", "content": SYSTEM},
                         {"role": "user", "content": TEMPLATE.format(prompt=prompt, a=a, b=b)}],
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    data = json.loads(r.read().decode("utf-8"))
                self.calls += 1
                return parse_verdict(data["choices"][0]["message"]["content"] or "")
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError, IndexError,
                    TypeError) as e:
                last = e
                if isinstance(e, urllib.error.HTTPError) and 400 <= e.code < 500 and e.code != 429:
                    break  # a bad request or model name will not get better
                time.sleep(0.5 * (attempt + 1))
        raise JudgeError(f"judge {self.endpoint} (model {self.model}) failed: {last}")

    def compare(self, prompt: str, candidate: str, baseline: str) -> tuple[float, list[str | None]]:
        """Outcome for ``candidate`` (1 win, 0.5 tie, 0 loss) from both orders, and the raw verdicts.

        Consistent verdicts (A then B, or B then A) decide; anything else is a tie.
        """
        first = self.ask(prompt, candidate, baseline)   # candidate is A
        second = self.ask(prompt, baseline, candidate)  # candidate is B
        if first == "A" and second == "B":
            return 1.0, [first, second]
        if first == "B" and second == "A":
            return 0.0, [first, second]
        return 0.5, [first, second]
