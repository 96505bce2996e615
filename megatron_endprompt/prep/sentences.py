"""``--split-sentences``: NLTK punkt sentence splitting, as Megatron-LM's preprocess_data.py.

Megatron-LM (``Encoder.initializer`` / ``Encoder.split``) loads punkt for ``--lang`` (downloading
it with ``nltk.download("punkt")`` at run time), splits each text in 1,000,000-character pieces
and keeps every sentence; with ``--keep-newlines`` the punkt parameters are reused with a
period-context pattern that lets a sentence keep the whitespace (newlines) after its end.
Nothing is downloaded here: the punkt data must already be on NLTK's search path (``NLTK_DATA``,
``~/nltk_data``, ...), as ``tokenizers/punkt_tab/<lang>/`` or ``tokenizers/punkt/<lang>.pickle``.
"""

from __future__ import annotations

import os

MAX_CHARS = 1_000_000
"""Texts are split into sentences in pieces of this many characters (as Megatron-LM)."""


class SentenceSplitError(ValueError):
    """nltk or its punkt data is missing."""


def _punkt_params(nltk, lang: str):
    from nltk.tokenize import punkt

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
        return punkt.PunktTokenizer(lang)._params
    except LookupError:
        pass
    try:
        found = nltk.data.find(f"tokenizers/punkt/{lang}.pickle")
    except LookupError:
        return None
    return nltk.data.load(f"file:{found}")._params


def _newline_keeping_vars():
    from nltk.tokenize.punkt import PunktLanguageVars

    class KeepNewlines(PunktLanguageVars):
        # Whitespace after a sentence end may be empty and stays with the sentence; the next
        # token is any non-space run.
        _period_context_fmt = (
            r"\S*%(SentEndChars)s\s*(?=(?P<after_tok>%(NonWord)s|(?P<next_tok>\S+)))"
        )

    return KeepNewlines()


class SentenceSplitter:
    """``split(text) -> list[str]`` with punkt for ``lang``."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False) -> None:
        try:
            import nltk
        except ImportError as err:
            raise SentenceSplitError(
                "--split-sentences needs the nltk package (pip install nltk) and its punkt data"
            ) from err
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        params = _punkt_params(nltk, lang)
        if params is None:
            where = os.environ.get("NLTK_DATA") or os.path.expanduser("~/nltk_data")
            raise SentenceSplitError(
                f"--split-sentences needs nltk punkt data at {where}/tokenizers/punkt_tab/{lang}/ "
                f"(or tokenizers/punkt/{lang}.pickle on NLTK_DATA / nltk.data.path); Megatron-LM "
                "downloads it at run time, which this tool does not do: run "
                "python -m nltk.downloader punkt_tab where there is network and copy the data"
            )
        lang_vars = _newline_keeping_vars() if keep_newlines else None
        self._punkt = (
            PunktSentenceTokenizer(params, lang_vars=lang_vars)
            if lang_vars
            else PunktSentenceTokenizer(params)
        )

    def split(self, text: str) -> list[str]:
        """The sentences of ``text``."""
        return [
            s
            for i in range(0, len(text), MAX_CHARS)
            for s in self._punkt.tokenize(text[i : i + MAX_CHARS])
        ]
