"""Moderation of what a learner writes and what the tutor answers, for young learners.

Two checks, either of which flags a text:
- `better-profanity`'s word list (swearing, slurs, sexual words; it also catches spellings such as
  "f*ck" and "sh1t"), minus a few words a history or science lesson needs ("murder", "slave", ...).
- A small table of request patterns for the harms a word list does not see because the words are
  ordinary ("how do I hurt myself", "where can I buy weed", "how do I make a bomb"): self-harm,
  violence, drugs and alcohol, sexual content and hate. No library in the registry covers these
  offline (the classifiers that do need a hub download), so the table is ours, kept short, and
  measured: `bench/bench_moderation.py` reports recall on `core/assets/unsafe_requests.jsonl` and
  the false-positive rate on the tutoring prompt set (docs/moderation.md has the numbers). The
  patterns were written against the set's `dev` split only; the `final` split is for reporting.

An unsafe input gets a kind refusal (`refusal`) that names no rule, so it cannot be used to probe
the filter, and points a learner who may be at risk to a trusted adult. An unsafe reply is replaced
by `OUTPUT_REPLACEMENT` before it is shown.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from better_profanity import Profanity

CATEGORIES = ("profanity", "sexual", "self_harm", "violence", "drugs", "hate")

# Words of better-profanity's list that ordinary lessons use ("Why did one murder start a war?",
# "How did the slave trade work?", "How did Hitler come to power?", `len(items)` in Python code,
# "Which organ pumps blood?", and "10 in" read as "loin").
LESSON_WORDS = ("murder", "slave", "hitler", "len", "nazi", "sexual", "sex", "breast", "kill",
                "killing", "drug", "drugs", "weapon", "gun", "bomb", "organ", "loin")

_ME = r"(?:myself|my\s*self)"  # not "me": "tones are killing me" is an idiom
_PERSON = (r"(?:someone|somebody|anyone|people|him|her|them|you|my\s+\w+|the\s+(?:boy|girl|kid|teacher)\w*"
           r"|(?:a|the)\s+(?:person|classmate|student|child|kid|dog|cat)s?|my\s+neighbou?r'?s\s+\w+)")
_DRUG = (r"(?:weed|cannabis|marijuana|cocaine|coke|meth|crystal\s+meth|heroin|ecstasy|mdma|lsd|"
         r"ketamine|a\s+joint|joints|vapes?|vaping|vodka|beer|alcohol|booze|pills?)")
_GROUP = (r"(?:black|white|asian|gay|lesbian|trans|muslims?|jews?|jewish|christians?|hindus?|"
          r"immigrants?|refugees?|women|girls|boys|men|disabled|fat|poor)")
_CONTEMPT = (r"(?:stupid|dumb|disgusting|gross|lazy|vermin|terrorists?|inferior|superior|worse|"
             r"animals|kicked\s+out|go\s+back|should\s+die|slurs?|insults?)")

# category -> patterns, matched case-insensitively on the text with runs of spaces collapsed
TOPICS: dict[str, tuple[str, ...]] = {
    "self_harm": (
        rf"\b(?:kill|hurt|harm|cut|starve|hang|burn)(?:ing)?\s+{_ME}\b",
        r"\bsuicid\w*",
        r"\b(?:end|take)\s+my\s+(?:own\s+)?life\b",
        r"\b(?:don'?t|do\s+not|dont)\s+want\s+to\s+(?:live|be\s+alive|be\s+here|exist)\b",
        r"\b(?:way|ways)\s+to\s+die\b",
        r"\bnot\s+wake\s+up\b",
        r"\bbetter\s+off\s+(?:if\s+i\s+(?:was|were)\s+dead|without\s+me)\b",
        r"\b(?:jump\s+off|jump\s+from)\b.{0,40}\bdie\b",
        r"\bwant\s+to\s+die\b",
    ),
    "profanity": (  # bullying and insults, which are ordinary words
        r"\b(?:idiot|loser|moron|dumbass|retard\w*)s?\b",
        r"\bmake\s+\w+\s+cry\b",
        r"\b(?:stop|not)\s+(?:talking|playing)\s+to\s+(?!you\b|me\b)\w+",
        r"\b(?:nasty|mean|cruel|hurtful)\s+(?:comment|message|poem|joke|post|names?)\b",
        r"\bswear\s*words?\b",
    ),
    "violence": (
        r"\b(?:make|build|making|building)\s+(?:a\s+|an\s+)?(?:pipe\s+)?(?:bomb|explosives?|grenade)s?\b",
        r"\bmolotov\b",
        r"\b(?:get|buy|find)\s+(?:a\s+)?(?:gun|pistol|rifle)\b",
        r"\bshoot\s+up\b",
        rf"\b(?:kill|stab|shoot|poison|hurt|strangle|beat\s+up|punch|attack)\s+{_PERSON}",
        r"\b(?:knife|gun|weapon)\s+to\s+(?:hurt|kill|stab)\b",
        r"\buntil\s+(?:she|he|they)\s+bleeds?\b",
        r"\bget\s+away\s+with\s+(?:it|murder|hurting|killing)\b",
    ),
    "drugs": (
        rf"\b(?:buy|get|smoke|snort|inject|grow|make|roll|hide|take|try|drink)\w*\s+(?:some\s+)?{_DRUG}",
        rf"\b(?:weed|cannabis|marijuana|cocaine|meth|heroin|ecstasy|mdma|ketamine)\b",
        r"\bget(?:ting)?\s+(?:high|drunk|stoned|wasted)\b",
        r"\b(?:pass|passed)\s+out\b.{0,20}\b(?:drink|alcohol)|\b(?:drink|alcohol)\b.{0,40}\bpass\s+out\b",
        r"\bvaping\b",
    ),
    "sexual": (
        r"\b(?:sexy|sexting|nudes?|naked|porn\w*|horny|erotic|strip\s+for)\b",
        r"\bwhat\s+does\s+sex\s+feel\b",
        r"\b(?:have|having|had)\s+sex\b",
        r"\bsex\s+(?:story|stories|chat|pictures?|videos?)\b",
        r"\btalk\s+dirty\b",
        # an adult asking a child for pictures: the refusal points to a trusted adult
        r"\b(?:pictures?|photos?|pics?|videos?)\s+of\s+(?:me|myself)\b.{0,40}\b(?:underwear|naked|undressed|bath|shower|bed)\b",
        r"\b(?:stranger|someone|somebody|a\s+man|a\s+guy)\b.{0,40}\basked\s+me\s+(?:for|to\s+send)\b.{0,20}\b(?:pictures?|photos?|pics?|nudes?)\b",
    ),
    "hate": (
        rf"\b{_GROUP}\b(?:\s+people)?\s+(?:are|is|should|were)\b.{{0,40}}\b{_CONTEMPT}\b",
        rf"\b{_CONTEMPT}\b.{{0,20}}\b(?:for|about)\s+{_GROUP}",
        rf"\bjokes?\s+about\s+{_GROUP}",
        r"\bsuperior\s+race\b",
        r"\b(?:hitler|nazis?)\s+(?:was|were)\s+right\b",
        rf"\bwhy\s+are\s+{_GROUP}\b.{{0,30}}\b{_CONTEMPT}\b",
        rf"\b{_GROUP}\b.{{0,30}}\btoo\s+(?:dumb|stupid)\b",
    ),
}

# A streamed reply is checked on its last STREAM_WINDOW characters at each chunk (no pattern is
# longer), so the cost per chunk stays flat as the reply grows; the whole reply is checked at the end.
STREAM_WINDOW = 240

OUTPUT_REPLACEMENT = ("I can't help with that one. Let's get back to your learning: what would you "
                      "like to work on?")

_REFUSALS = {
    "self_harm": ("I'm really glad you told me. I'm a study helper, so I can't help with this, but "
                  "you deserve support: please talk to a trusted adult, like a parent, a teacher or "
                  "the school counsellor, today. If you are in danger right now, call your local "
                  "emergency number."),
    "sexual": ("I can't help with that. If someone online or in person is asking you for pictures "
               "or making you feel uncomfortable, it is not your fault: tell a trusted adult, like a "
               "parent or a teacher. I'm happy to help with your school work instead."),
    "": ("I can't help with that. I'm here to help you learn, so let's pick something from your "
         "lessons: a question in maths, science, languages or anything you're studying."),
}


@dataclass(frozen=True)
class Verdict:
    flagged: bool
    category: str = ""  # one of CATEGORIES when flagged
    source: str = ""  # "wordlist" | "topics"


@dataclass
class ModerationConfig:
    enabled: bool = True
    # extra words a school allows (a subject's vocabulary the word list would flag)
    allowed_words: list[str] = field(default_factory=list)


class _WordSet:
    """better-profanity's word set with fast membership: the same matches, found by one compiled regex.

    The library keeps a list of `VaryingString`s (each word with its spellings, "a" as "a@*4" and so
    on) and tests `word in list` by comparing against every entry in Python: ~45 ms for a 240-character
    window, as long as a decode step, on every streamed chunk. Here each entry becomes a pattern of
    character classes, all in one alternation, and repeated words (the window slides by a few
    characters) are answered from a cache. `tests/test_safety.py` checks it agrees with the library."""

    def __init__(self, entries: list) -> None:
        patterns = []
        for entry in entries:
            combos = entry._char_combos  # one tuple of spellings per character of the word
            if not all(len(c) == 1 for spellings in combos for c in spellings):
                raise ValueError("only single-character spellings are supported")
            patterns.append("".join("[" + "".join(re.escape(c) for c in spellings) + "]" if len(spellings) > 1
                                    else re.escape(spellings[0]) for spellings in combos))
        self._pattern = re.compile("(?:" + "|".join(sorted(patterns)) + ")")
        self._size = len(entries)
        self._cache: dict[str, bool] = {}

    def __len__(self) -> int:
        return self._size

    def __contains__(self, word: object) -> bool:
        if not isinstance(word, str):
            return False
        found = self._cache.get(word)
        if found is None:
            if len(self._cache) > 50_000:  # a long-running server sees many words; start afresh
                self._cache.clear()
            found = self._cache[word] = self._pattern.fullmatch(word) is not None
        return found


class Moderator:
    """Checks a text; cheap enough to run on every streamed chunk of a reply (on its tail)."""

    def __init__(self, config: ModerationConfig | None = None) -> None:
        self.config = config or ModerationConfig()
        self._words = Profanity()
        self._words.load_censor_words(whitelist_words=[*LESSON_WORDS, *self.config.allowed_words])
        self._words.CENSOR_WORDSET = _WordSet(self._words.CENSOR_WORDSET)
        self._topics = [(category, re.compile(pattern, re.IGNORECASE))
                        for category, patterns in TOPICS.items() for pattern in patterns]

    def check(self, text: str) -> Verdict:
        if not self.config.enabled or not text:
            return Verdict(False)
        flat = " ".join(text.split())
        for category, pattern in self._topics:
            if pattern.search(flat):
                return Verdict(True, category, "topics")
        if self._words.contains_profanity(flat):
            return Verdict(True, "profanity", "wordlist")
        return Verdict(False)


def refusal(verdict: Verdict) -> str:
    """What a learner is told when moderation stops their message (never which rule fired)."""
    return _REFUSALS.get(verdict.category, _REFUSALS[""])
