"""Redaction of personal details before text enters training data, exports or cycle reports.

scrubadub finds emails, URLs, social handles, credentials, card and social security numbers,
phone numbers (one detector per region a school is likely to be in: phonenumbers validates each
by region) and postcodes. Two small detectors of ours cover what it leaves to optional NLP models
that need a hub download: a street address ("12 Baker Street") and a name a learner gives
("my name is Ada", "I'm called Ada"). Each detail becomes a placeholder such as `{{EMAIL}}`, so a
reader (and a trainer) still sees that something was there.

What a learner sees in their own chat is not redacted: a tutor that forgets the name it was just
told would be a worse tutor. Redaction is applied where text leaves the conversation.
"""
from __future__ import annotations

import hashlib

import re
import warnings
from functools import lru_cache

import scrubadub
import scrubadub.detectors
import scrubadub.filth

PHONE_REGIONS = ("en_US", "en_GB", "en_IE", "en_AU", "en_CA", "en_NZ", "de_DE", "fr_FR")

_STREET = (r"street|st|road|rd|avenue|ave|lane|ln|drive|dr|close|way|court|ct|place|pl|crescent|"
           r"terrace|gardens|grove|boulevard|blvd")


class StreetAddressFilth(scrubadub.filth.Filth):
    type = "address"


class StreetAddressDetector(scrubadub.detectors.RegexDetector):
    """A house number and a street: "12 Baker Street", "221b Baker St.", "4 Elm Close"."""

    name = "street_address"
    filth_cls = StreetAddressFilth
    regex = re.compile(rf"\b\d{{1,5}}[a-z]?,?\s+(?:[A-Z][a-z]+\s+){{1,3}}(?:{_STREET})\b\.?", re.IGNORECASE)


class EmailDetector(scrubadub.detectors.RegexDetector):
    """An address with an "@", or spelled out ("ada at example dot com").

    scrubadub's own email detector also takes "spreadsheets at work" and "places at once".
    """

    name = "email_strict"
    filth_cls = scrubadub.filth.EmailFilth
    regex = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"
                       r"|\b[\w.+-]+\s+at\s+[\w-]+\s+dot\s+(?:com|org|net|edu|co|uk|de|fr|ie|au|ca|nz)\b",
                       re.IGNORECASE)


class GivenNameFilth(scrubadub.filth.Filth):
    type = "name"


class GivenNameDetector(scrubadub.detectors.RegexDetector):
    """A name the writer gives for themselves or someone close: "my name is Ada Lovelace"."""

    name = "given_name"
    filth_cls = GivenNameFilth
    # Only the capitalised words after the phrase are the filth (the lookbehind keeps the phrase).
    regex = re.compile(r"(?:(?<=\bname is )|(?<=\bname's )|(?<=\bI'm called )|(?<=\bI am called )"
                       r"|(?<=\bcall me )|(?<=\bnamed )|(?<=\bcalled ))"
                       r"[A-Z][a-z'\-]+(?:\s+[A-Z][a-z'\-]+)?")


@lru_cache(maxsize=1)
def _scrubber() -> scrubadub.Scrubber:
    # Built once per process: building loads phonenumbers' region data.
    detectors = ["credential", "credit_card", EmailDetector(), "twitter", "url", "social_security_number",
                 StreetAddressDetector(), GivenNameDetector()]
    detectors += [scrubadub.detectors.PhoneDetector(name=f"phone_{r}", locale=r) for r in PHONE_REGIONS]
    detectors += [scrubadub.detectors.PostalCodeDetector(name="postalcode_gb", locale="en_GB")]
    with warnings.catch_warnings():  # each regional detector warns that it is not the scrubber's locale
        warnings.simplefilter("ignore")
        return scrubadub.Scrubber(detector_list=detectors)


def _types(filth: scrubadub.filth.Filth) -> list[str]:
    # Overlapping finds (one number valid in several regions) come back merged.
    inner = getattr(filth, "filths", None)
    return sorted({t for f in inner for t in _types(f)}) if inner else [filth.type]


def redact(text: str) -> str:
    """`text` with each personal detail replaced by a placeholder such as {{EMAIL}}."""
    if not text:
        return text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        filths = list(_scrubber().iter_filth(text))
    # Replaced from the end so that earlier offsets stay valid.
    for filth in sorted(filths, key=lambda f: f.beg, reverse=True):
        text = text[:filth.beg] + "{{" + "+".join(_types(filth)).upper() + "}}" + text[filth.end:]
    return text


def personal_details(text: str) -> list[str]:
    """The kinds of personal detail found in `text` (for reports: which kinds, never the values)."""
    if not text:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sorted({t for filth in _scrubber().iter_filth(text) for t in _types(filth)})


def pseudonym(user: str) -> str:
    """A stable stand-in for an account name in files that leave the database (cycle reports)."""
    return "user:" + hashlib.sha256(f"tutor-user\n{user}".encode()).hexdigest()[:10] if user else "local"
