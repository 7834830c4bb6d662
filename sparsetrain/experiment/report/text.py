"""User text (run, phase, dataset and setting names, errors, notes) as the reports write it: as Markdown that
renders as the text (md_cell, md_heading) and as UTF-8 can write it (shown_text)."""
from __future__ import annotations

import re

__all__ = ["label_value", "md_cell", "md_heading", "md_quoted", "shown_text", "shown_literal"]


# What Markdown would read in a table cell's text, each matched alone: a line break (it ended the row); a `\\`
# before ASCII punctuation or a line break (an escape); `|` (GFM: a cell's end); emphasis, code, strikethrough,
# math (GitHub) marks; a `_` but one inside a word (no emphasis there: snake_case stays as written); a link's
# `](`/`][`; `<` (HTML, a literal `<br>`, an autolink); an `&` that starts an entity (`&lt;`, `&#124;`).
# GitHub also links or replaces plain text, whatever its escapes (an emoji's `\\:` is `:` by then): a `:name:`
# emoji shortcode, a bare `http(s)://`/`ftp://` URL, a `www.` domain (after no letter or digit), an email address
# (`mailto:`, `xmpp:` included), an @mention (after no ASCII letter, digit or `_`: a link and a notification), an
# issue reference (`#1`, `owner/repo#1`, `GH-1`); each is cut by an empty `<wbr>` (no character shown or copied)
# matched first, as an empty match: after a shortcode's `:`, before a scheme's `://`, a `www`'s `.` and an
# address's `@`, after a mention's `@`, after a `#` before a digit (any: `run#3` too), before `GH`'s `-`.
_GH_TEXT = (r"(?<=:)(?=(?:[\w+-]*[A-Za-z][\w+-]*|[+-]1|100|1234):)|(?i:(?<=http)|(?<=https)|(?<=ftp))(?=://)"
            r"|(?i:(?<=www)(?<![^\W_]www))(?=\.\w)|(?<=[\w.+-])(?=@[\w-]+\.[\w-])"
            r"|(?<=@)(?<![A-Za-z0-9_]@)(?=[A-Za-z0-9])|(?<=#)(?=\d)|(?i:(?<=gh)(?<![^\W_]gh))(?=-\d)|")
_MD_ACTIVE = re.compile(_GH_TEXT + r"\r\n|[\r\n]|\\(?=[!-/:-@\[-`{-~\r\n])|[|*`~$<]|(?<![^\W_])_|_(?![^\W_])|\](?=[(\[])"
                        r"|&(?=[A-Za-z][A-Za-z0-9]*;|#[0-9]{1,7};|#[xX][0-9A-Fa-f]{1,6};)")
_SURROGATE = re.compile("[\ud800-\udfff]")
# a byte that is not UTF-8 (a surrogate escape) as repr and json.dumps write it, `\udcff`, after an even run of
# backslashes (an escape; a text's own `\udcff` is written `\\udcff` there)
_ESCAPED_BYTE = re.compile(r"(?<!\\)((?:\\\\)*)\\udc([89a-f][0-9a-f])")
_MD_AS = {"\r\n": "<br>", "\r": "<br>", "\n": "<br>", "<": "&lt;", "&": "&amp;"}
# what makes a text value of a label `k=v, k=v` (or a name of a `, `-joined note) read as more or other values: the
# separator `, `, a `=` (another setting's), a quote (a quoted value's own end) or space at either end (unseen)
_AMBIGUOUS = re.compile(r", |=|['\"]|\A\s|\s\Z")


def shown_text(text: str) -> str:
    """`text` as UTF-8 can write it: each byte of a name that is not UTF-8 (os.fsdecode's surrogate escape, a run
    folder's from the filesystem) as `\\xNN`, any other lone surrogate (a JSON `\\ud800`'s) as `\\uNNNN`; writing
    one raised UnicodeEncodeError before 2026-12-07, the report left unwritten."""
    return _SURROGATE.sub(lambda m: f"\\x{ord(m[0]) - 0xdc00:02x}" if 0xdc80 <= ord(m[0]) <= 0xdcff else
                          f"\\u{ord(m[0]):04x}", text)


def shown_literal(text: str) -> str:
    """A value as repr or json.dumps wrote it (a setting's list: `teachers=['t\\udcff.pt']`) with each byte that is
    not UTF-8 spelled as shown_text spells it in a name, `\\xNN` (a label wrote `\\udcff` before 2026-12-07)."""
    return _ESCAPED_BYTE.sub(r"\1\\x\2", text)


def md_cell(value) -> str:
    """`value` as the text of one Markdown table cell that renders as that text: each line break as `<br>` (one
    ended the row), each `|` escaped `\\|` (GFM: a bare one, a path's or an error's, split the row), each `\\`
    that Markdown would read as an escape doubled (a text's `\\|` lost its backslash before 2026-12-06), and the
    rest of what Markdown reads escaped (CommonMark backslash escapes; `<` as `&lt;`, an entity's `&` as `&amp;`):
    `*x*`, `_x_`, backticks, `~~x~~`, `$x$`, `[a](b)`, a literal `<br>` or other HTML (rendered, or dropped, before
    2026-12-06); GitHub's emoji `:name:`, bare URLs, `www.` domains and email addresses cut by `<wbr>` (rendered as
    an emoji or a link before 2026-12-07); @mentions and issue references (`#1`, `owner/repo#1`, `GH-1`) cut alike
    (a link and a notification before 2026-12-07). Only for text shown as written (errors, paths, labels): a cell formatted
    on purpose (bold) is not passed through it. A name that is not UTF-8 as shown_text writes it."""
    return _MD_ACTIVE.sub(lambda m: _MD_AS.get(m[0]) or ("\\" + m[0][-1] if m[0] else "<wbr>"),
                           shown_text(str(value)))


def md_quoted(value) -> str:
    """`value` quoted as Python writes a str (repr: `'a, b'`, its quote, backslash or line break escaped; a byte that
    is not UTF-8 `\\xNN`) as md_cell's text: one name of a list written `, `-separated (a bare name's own `, ` read
    as the list's before 2026-12-07), as a setting label writes a list's (`teachers=['a, b.pt']`)."""
    return md_cell(shown_literal(repr(str(value))))


def label_value(text: str) -> str:
    """`text`, a text setting's value in a label `k=v, k=v` (a phase name in a `, `-joined note), as written, or
    quoted as Python writes a str (repr; a byte that is not UTF-8 `\\xNN`) where it holds `, `, `=`, a quote or
    space at either end: `label_file='/x/a, b.pt'` (read as two settings before 2026-12-07); `eps=0.5, seed=0` and
    `/x/c.pt` stay as they are. Plain text (a legend's, a CSV's): md_cell makes it a cell's, md_quoted's text then."""
    return shown_literal(repr(text)) if _AMBIGUOUS.search(text) else text


def md_heading(value) -> str:
    """`value` as an ATX heading's text (after `# `) that renders as that text: md_cell's, its last `#` escaped `\\#`
    where nothing but spaces follow (a name ending in ` #` lost it: CommonMark's optional closing sequence)."""
    return re.sub(r"#(?=[ \t]*\Z)", r"\\#", md_cell(value))
