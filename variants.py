"""
Where a taught label is recalled beyond its exact tokens: the words of English that make a text
specific, normalised text, and the reading of a label as subject + linking verb + the rest.

lut.py fires an entry where the text ends with its exact trigger tokens. People do not retype a
label verbatim, and GPT-2's BPE gives "alice", " Alice" and " ALICE" unrelated tokens, so exact
tokens alone miss every variant. This module reads the *text* instead, normalised (NFKD without
accents, casefolded, curly quotes made straight, a hyphen between two letters made a space,
runs of spaces made one), and decides which label goes on where, and from which of its tokens:

  statement   the text names the label's subject (its exact words or a part of it that is rare
              and no other subject in the LUT shares: "Kowalski" for "Alice Kowalski") and then
              - goes on with the label's own words             "alice KOWALSKI is a"   (normalized)
              - after a delimited insertion                     "Alice Kowalski, as you know, is a",
                ", ... ,", " ( ... )", " - ... -", or an adverb  "Alice Kowalski (who I met) is a"
              - with another form of its linking verb           "Alice Kowalski was a", "... 's a",
                (is / was / 's / has been ..., has / had,      "Zorblax costs" -> "Zorblax cost"
                works / worked / has worked / is working ...)
              - or a possessive of an attribute noun            "Alice Kowalski's job: a"
              and the text must end on one of the label's token boundaries: what follows is the
              label's next token. Anything else after the subject ("Alice Kowalski called me and
              said that the") fires nothing.
  question    the text's last line is an answer line ("A:", "Answer:", "Assistant:") and the turn
              before it asks about a subject ("?" or a question word first: who, what, tell,
              describe ...): the answer states that label from its first word, as long as the
              answer so far is the label's own start. Several labels about one subject: the one
              sharing most words with the question, then the newest.
  text start  a label made only of common words ("I think that it is.") is recalled only where a
              text starts with its first two words (normalised), so it changes no other text.

How the linking verb's other forms are found: a fixed table of English auxiliaries and
irregular verbs plus regular inflection ("works" -> "worked", "has worked", "is working"). The
model's own embeddings were the other candidate; on random weights (the bench's first model)
they carry no meaning, and on a small trained model they mix verbs with unrelated words, so a
rule a reader can check wins. A reworded relation ("works as" for "is") is not a variant.

The values that make the model emit a label's tokens this way are the label's *canonical*
entries (lut.py: every token of the label spelled after a space, keyed by position), so what a
variant fires is the same taught token and value as the exact path. Measurements are in
docs/lut.md; bench/lut_eval.py --variants reproduces them.
"""
import collections
import functools
import re
import unicodedata

RARE_ZIPF = 3.0  # one word rarer than this (under ~1 per million words) makes a trigger specific
COMMON_ZIPF = 5.5  # ... or two words rarer than this (not "the", "is", "think", "people", "New")
WORD_RE = re.compile(r"\w+(?:'\w+)*")
WINDOW = 96  # tokens of text read back from the position being decided
START_WORDS = 2  # a label of common words fires once a text starts with this many of its words
LINK_WITHIN = 6  # words after a subject's name in which its linking verb is looked for

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'", "\u00b4": "'",
                         "`": "'", "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2033": '"', "\u00ab": '"',
                         "\u00bb": '"'})
_HYPHEN = re.compile(r"(?<=\w)[-\u2010-\u2015\u2212](?=\w)")  # hyphenation: "Alice-Kowalski"
_DASH = re.compile(r"[\u2010-\u2015\u2212]")
_SPACE = re.compile(r"[^\S\n]+")  # runs of spaces (newlines are kept: they separate turns)
_WORDS = re.compile(r"\w+")


@functools.lru_cache(maxsize=65536)
def word_zipf(word):
    """How common an English word is: log10 of its frequency per billion words (0 = unknown)."""
    from wordfreq import zipf_frequency
    return zipf_frequency(word, "en")


def is_specific(text, open_left=False, open_right=False):
    """Whether `text` is rare enough in ordinary English to trigger a label on its own: it holds a
    whole word rarer than RARE_ZIPF, or two rarer than COMMON_ZIPF. A word touching the start
    (end) of text counts only if open_left (open_right) is False, i.e. the word cannot go on
    past that edge."""
    content = 0
    for m in WORD_RE.finditer(text):
        if (m.start() == 0 and open_left) or (m.end() == len(text) and open_right):
            continue
        z = word_zipf(m.group())
        if z < RARE_ZIPF:
            return True
        content += z < COMMON_ZIPF
    return content >= 2


def trigger_prefix(text):
    """The shortest start of `text` (whole words) that is specific, or None."""
    for m in WORD_RE.finditer(text):
        if is_specific(text[:m.end()]):
            return text[:m.end()]
    return None


def normalize(text):
    """Text as variants are compared: accents dropped, casefolded, quotes straight, hyphenated
    words split, runs of spaces made one."""
    if not text.isascii():
        text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
        text = text.translate(_QUOTES).replace("\r\n", "\n")
    text = _HYPHEN.sub(" ", text.casefold())
    if not text.isascii():
        text = _DASH.sub("-", text)
    return _SPACE.sub(" ", text)


# ---------------------------------------------------------------------------- linking verbs

def _classes():
    be = [" is", " was", "'s", " has been", " had been", " will be", " is still", " was still", " remains",
          " remained", " is now", " was once"]
    be_plural = [" are", " were", "'re", " have been", " had been", " will be", " are still", " were still",
                 " remain", " remained", " are now"]
    has = [" has", " had", "'s got", " has got", " still has", " will have", " has had"]
    have = [" have", " had", "'ve got", " have got", " still have", " will have", " have had"]
    return [be, be_plural, has, have]


LINK_CLASSES = _classes()
# third person present -> (past, past participle) of the irregular verbs a fact is likely told with
IRREGULAR = {
    "costs": ("cost", "cost"), "makes": ("made", "made"), "sells": ("sold", "sold"), "builds": ("built", "built"),
    "holds": ("held", "held"), "runs": ("ran", "run"), "leads": ("led", "led"), "teaches": ("taught", "taught"),
    "writes": ("wrote", "written"), "speaks": ("spoke", "spoken"), "grows": ("grew", "grown"),
    "brings": ("brought", "brought"), "gets": ("got", "got"), "comes": ("came", "come"),
    "takes": ("took", "taken"), "keeps": ("kept", "kept"), "sits": ("sat", "sat"), "stands": ("stood", "stood"),
    "says": ("said", "said"), "thinks": ("thought", "thought"), "pays": ("paid", "paid"),
    "knows": ("knew", "known"), "meets": ("met", "met"), "sees": ("saw", "seen"), "sings": ("sang", "sung"),
    "drives": ("drove", "driven"), "flies": ("flew", "flown"), "sleeps": ("slept", "slept"),
    "feels": ("felt", "felt"), "finds": ("found", "found"), "loses": ("lost", "lost"), "wins": ("won", "won"),
    "eats": ("ate", "eaten"), "gives": ("gave", "given"), "goes": ("went", "gone"), "does": ("did", "done"),
    "sends": ("sent", "sent"), "spends": ("spent", "spent"), "buys": ("bought", "bought"),
    "leaves": ("left", "left"), "lends": ("lent", "lent"), "tells": ("told", "told"),
    "shows": ("showed", "shown"), "begins": ("began", "begun"), "becomes": ("became", "become"),
    "hides": ("hid", "hidden"), "rides": ("rode", "ridden"), "wears": ("wore", "worn"), "hears": ("heard", "heard"),
}
NOT_VERBS = {"its", "his", "hers", "this", "thus", "plus", "always", "perhaps", "sometimes", "towards", "less",
             "unless", "across", "news", "series", "species", "yes", "as", "us", "was", "has", "is", "does",
             "ours", "yours", "theirs", "whereas", "besides", "afterwards", "nevertheless", "was"}


def verb_forms(word):
    """The forms of a third-person present verb that state the same relation, or []."""
    if word in NOT_VERBS or len(word) < 4 or not word.endswith("s") or word.endswith("ss") or not word.isalpha():
        return []
    if word.endswith("ies"):
        base = word[:-3] + "y"
    elif word.endswith(("ches", "shes", "xes", "zes", "oes", "sses")):
        base = word[:-2]
    else:
        base = word[:-1]
    if word in IRREGULAR:
        past, participle = IRREGULAR[word]
    else:
        past = (base + "d" if base.endswith("e") else base[:-1] + "ied" if base.endswith("y") and base[-2:-1] not in "aeiou"
                else base + "ed")
        participle = past
    ing = (base[:-1] if base.endswith("e") and not base.endswith("ee") else base) + "ing"
    return [f" {word}", f" {past}", f" has {participle}", f" had {participle}", f" will {base}", f" still {word}",
            f" is {ing}", f" was {ing}", f" has been {ing}"]


def link_of(rest):
    """The linking verb that `rest` (normalised text after a subject) starts with, and its forms:
    (link, [forms, longest first]) or (None, [])."""
    best, forms = None, set()
    for cls in LINK_CLASSES:
        for form in cls:
            if rest.startswith(form) and (len(rest) == len(form) or not rest[len(form)].isalnum()):
                if best is None or len(form) > len(best):
                    best, forms = form, set(cls)
                elif form == best:
                    forms |= set(cls)
    if best is None:
        m = re.match(r" ([a-z]+)\b", rest)
        if m and verb_forms(m.group(1)):
            best, forms = m.group(0), set(verb_forms(m.group(1)))
    return best, sorted(forms, key=len, reverse=True)


INSERTION_RE = re.compile(r", [^,.!?;:\n]{1,100},| \([^()\n]{1,100}\)| - [^\n]{1,100}? -")
ADVERB_RE = re.compile(r" (?:\w{3,}ly|still|also|now|indeed|truly|really|actually|certainly|apparently|reportedly|"
                       r"currently|once|then|too|however)\b")
ATTRIBUTES = ("job", "profession", "occupation", "role", "title", "work", "career", "trade", "business", "price",
              "cost", "location", "home", "hometown", "origin", "position", "specialty", "speciality", "field",
              "line of work", "description", "population", "address")
POSSESSIVE_RE = re.compile(r"'s (?:" + "|".join(ATTRIBUTES) + r")(?::| is| was| =)")
ANSWER_RE = re.compile(r"(?:^|\n)(?:a|answer|assistant|ai|bot)\s?:([^\n]*)$")
TURN_RE = re.compile(r"^(?:a|answer|assistant|ai|bot|system)\s?:")
ROLE_RE = re.compile(r"^(?:q|question|user|human|me)\s?:\s*")
POLITE_RE = re.compile(r"^(?:(?:please|kindly|now|ok|okay|so|and|hi|hello|hey)\b[,!.]?\s*)+")
QUESTION_WORDS = {"who", "what", "where", "when", "which", "how", "why", "whose", "whom", "tell", "describe",
                  "explain", "do", "does", "did", "is", "are", "was", "were", "can", "could", "would", "give",
                  "say", "introduce", "remind", "know", "any", "anything", "info", "information"}
STOP_WORDS = QUESTION_WORDS | {"a", "an", "the", "me", "about", "you", "of", "from", "to", "in", "on", "s"}


# ---------------------------------------------------------------------------- one label

class Form:
    """One label read for variant recall. canon: the label's tokens as spelled after a space (its
    canonical entries' targets); the label is recalled from its token k where the normalised text
    ends at bounds[k]'s offset into norm."""

    def __init__(self, label_id, label, context, canon, decode, ends=False):
        """ends: the label has a canonical entry after its last token (<|endoftext|>), which ends
        an answer that states it."""
        lesson = (context or "") + label
        text = decode(canon)
        self.id, self.canon, self.ends = label_id, canon, ends
        self.norm = normalize(text)
        self.bounds = {}  # offset into norm -> number of canonical tokens before it
        for k in range(len(canon)):
            prefix = decode(canon[:k])
            n = normalize(prefix)
            if "\ufffd" not in prefix and self.norm.startswith(n):
                self.bounds.setdefault(len(n), k)
        self.bounds.setdefault(len(self.norm), len(canon))
        self.words = _stems(self.norm)
        self.asks = "\n" not in (context or "")  # a prompt-shaped context is not a fact to state
        self.anchors, self.link, self.forms, self.subject, self.start_at = [], None, [], None, None
        self.first = len(self.norm)  # statements recall it from here on: the label, not its context
        if not text.endswith(lesson):  # a character the vocabulary lacks: exact recall only
            return
        lead = text[:len(text) - len(lesson)]  # the canonical spelling's space
        self.first = len(normalize(lead + context)) if context else 0
        trig = trigger_prefix(lesson) or context
        if not trig:  # only common words: recalled where a text starts with it
            ends = [m.end() for m in WORD_RE.finditer(self.norm)]
            self.start_at = ends[min(START_WORDS, len(ends)) - 1] if ends else len(self.norm)
            return
        subject = trig + _name_tail(lesson[len(trig):])
        # the linking verb: right after the subject's name, else within a few words of it ("the wifi
        # password" + " at Quillmere House" + " is"); a verb is a word written in lower case
        for m in [None] + list(re.finditer(r" ([a-z][\w']*)", lesson[len(subject):]))[:LINK_WITHIN]:
            end = len(subject) + (m.start() if m else 0)
            link, forms = link_of(normalize(lesson[end:]))
            if link and (m or re.match(r"\s*'?[a-z]", lesson[end:])):
                subject = lesson[:end]
                break
        else:
            link, forms = None, []
        self.subj_end = len(normalize(lead + subject))
        if not self.norm.startswith(normalize(lead + subject)):  # normalisation moved its end: exact recall only
            return
        self.link, self.forms = link, forms
        self.subject = self.norm[:self.subj_end].strip()
        self.link_end = self.subj_end + len(self.link) if self.link else None
        self.anchors = [(self.subject, self.subj_end)] + [a for a in _rare_spans(self.norm, self.subj_end)
                                                          if a[0] != self.subject]

    def next_token(self, b, statement=True):
        """k where the text ends at offset b of norm (a token boundary with a token after it), or
        None. An answer (statement=False) that has stated the whole label gets its end."""
        k = self.bounds.get(b)
        if k is None or k > len(self.canon) or (k == len(self.canon) and (statement or not self.ends)):
            return None
        if statement and b < self.first:
            return None
        return k

    def after_subject(self, rest, anchor, anchor_end):
        """rest: normalised text after a mention of `anchor` (ending at anchor_end of norm) ->
        (k, [how]): the label goes on from its token k; or None."""
        between = self.norm[anchor_end:self.subj_end]  # the rest of the subject, which a part may leave out
        if rest.startswith(between):
            rest = rest[len(between):]
        how = [] if anchor == self.subject else ["subject_part"]
        k = self._tail(rest, self.subj_end)
        if k is not None:
            return k, how + ["normalized"]
        if not self.link:
            return None
        m = POSSESSIVE_RE.match(rest)
        if m:
            k = self._tail(rest[m.end():], self.link_end)
            return (k, how + ["possessive"]) if k is not None else None
        m = INSERTION_RE.match(rest)
        if m:
            rest, how = rest[m.end():], how + ["insertion"]
        m = ADVERB_RE.match(rest)
        if m and not any(rest.startswith(f) for f in self.forms):
            rest, how = rest[m.end():], how + ["insertion"]
        for form in self.forms:
            if rest.startswith(form) and (len(rest) == len(form) or not rest[len(form)].isalnum()):
                k = self._tail(rest[len(form):], self.link_end)
                if k is not None:
                    return k, how + (["verb_form"] if form != self.link else [])
        return None

    def _tail(self, text, at):
        """k where `text` is the label's own normalised words from offset `at` up to a token boundary."""
        return self.next_token(at + len(text)) if self.norm.startswith(text, at) else None


def _name_tail(text):
    """The words right after a subject's trigger that still belong to its name: capitalised or
    numbers ("Quillmere" + " Bank", "Zorblax" + " 3000")."""
    m = re.match(r"(?:\s+(?:[A-Z][\w'-]*[\w]|[A-Z]|\d[\w.,]*\d|\d))+", text)
    if not m:
        return ""
    tail = m.group(0)
    return re.sub(r"'s$", "", tail)


def _rare_spans(norm, end):
    """The shortest specific runs of whole words in norm[:end], none holding another: the parts
    of a subject that name it alone ("kowalski" in "alice kowalski")."""
    words = list(WORD_RE.finditer(norm[:end]))
    spans = []
    for i in range(len(words)):
        for j in range(i, len(words)):
            if is_specific(norm[words[i].start():words[j].end()]):
                spans.append((i, j))
                break
    minimal = [(i, j) for i, j in spans if not any((a, b) != (i, j) and i <= a and b <= j for a, b in spans)]
    return [(norm[words[i].start():words[j].end()], words[j].end()) for i, j in minimal]


# ---------------------------------------------------------------------------- one LUT

class Variants:
    """The labels of one LUT read for variant recall: read() looks at the text, question() and
    statement() decide what fires there."""

    def __init__(self, forms, tokenizer):
        self.decode = tokenizer.decode
        self.forms = forms  # teaching order
        owners = collections.defaultdict(set)
        for f in forms:
            for anchor, _ in f.anchors:
                owners[anchor].add(f.subject)
        self.by_word = collections.defaultdict(list)  # an anchor's last word -> [(anchor, end, order, form)]
        for order, f in enumerate(forms):
            for anchor, end in f.anchors:
                if len(owners[anchor]) == 1:  # a part two subjects share names neither
                    self.by_word[_WORDS.findall(anchor)[-1]].append((anchor, end, order, f))
        for entries in self.by_word.values():
            entries.sort(key=lambda x: -len(x[0]))  # whole subjects before their parts
        self.starts = [(order, f) for order, f in enumerate(forms) if f.start_at is not None]
        # a text longer than this (in tokens) is no longer the start of a label of common words
        self.start_limit = max((2 * len(f.canon) + 4 for _, f in self.starts), default=0)
        # Where no anchor's last word is in the window as tokens (spelled lower, Title or UPPER
        # case, after a space or not), no subject is named and the text is not read: decoding it
        # costs more than a decode step of a small model.
        self.spellings = set()  # token sequences
        self.lengths = collections.defaultdict(set)  # last token -> lengths of the sequences it ends
        for word in self.by_word:
            for cased in {word, word.title(), word.upper()}:
                for spelled in (cased, " " + cased):
                    try:
                        ids = tuple(tokenizer.encode(spelled))
                    except ValueError:  # a character-level vocabulary lacks a character
                        continue
                    if ids:
                        self.spellings.add(ids)
                        self.lengths[ids[-1]].add(len(ids))
        # the last two tokens of each: a character vocabulary ends most words in a letter every
        # text has, but seldom in the same two
        self.pairs = {ids[-2:] for ids in self.spellings if len(ids) > 1}

    def _ends(self, tokens, lo, end):
        """Positions in [lo, end) where a spelling of an anchor's last word ends."""
        if self.lengths.keys().isdisjoint(tokens[lo:end]):  # the usual case, decided in C
            return []
        return [i for i in range(lo, end) if self._ends_at(tokens, i)]

    def _ends_at(self, tokens, i):
        """Whether a spelling of an anchor's last word ends at position i."""
        lengths = self.lengths.get(tokens[i])
        if lengths is None or (1 not in lengths and (i == 0 or (tokens[i - 1], tokens[i]) not in self.pairs)):
            return False
        return any(i + 1 >= n and tuple(tokens[i + 1 - n:i + 1]) in self.spellings for n in lengths)

    def _named(self, tokens, lo, end, memo):
        """Whether tokens[lo:end] name a subject (an anchor's last word in some spelling). memo (a
        dict kept with one sequence, whose first memo["stable"] tokens never change) remembers
        the last place among them where one was, so a decode step looks at its new tokens only:
        this runs for every row at every step."""
        if memo is None:
            return bool(self._ends(tokens, lo, end))
        stable = memo["stable"]
        if stable > end:
            stable = end
        scanned = memo.get("scanned", 0)
        if scanned < stable:
            for i in range(max(scanned, lo), stable):  # most often the one new token
                if self._ends_at(tokens, i):
                    memo["last"] = i
            memo["scanned"] = stable
        if memo.get("last", -1) >= lo:
            return True
        return stable < end and bool(self._ends(tokens, max(lo, stable), end))

    def quiet(self, tokens, first, last, memo=None):
        """Whether no variant can fire at any position from first to last: no subject named in
        their windows, none of them near the start of a label of common words."""
        lo = first + 1 - WINDOW if first >= WINDOW else 0
        if lo == 0 and first < self.start_limit:
            return False
        return not self._named(tokens, lo, last + 1, memo)

    def read(self, tokens, t, memo=None):
        """The text up to position t as variants see it, or None when no label could apply.
        memo: see _named."""
        lo = t + 1 - WINDOW if t >= WINDOW else 0
        at_start = lo == 0 and t < self.start_limit
        if not at_start and not self._named(tokens, lo, t + 1, memo):
            return None
        q = normalize(self.decode(tokens[lo:t + 1]))
        hits = set(_WORDS.findall(q)) & self.by_word.keys() if self.by_word else set()
        if not hits and not at_start:
            return None
        return q, hits, at_start

    def question(self, view):
        """(form, k) where the text is answering a question about a label's subject, or None."""
        q, hits, _ = view
        m = ANSWER_RE.search(q) if hits else None
        if not m:
            return None
        answer = m.group(1)
        turn = []
        for line in reversed(q[:m.start()].split("\n")):
            if TURN_RE.match(line):
                break
            turn.append(line)
        asked = "\n".join(reversed(turn))
        first = _WORDS.findall(POLITE_RE.sub("", ROLE_RE.sub("", asked.strip())))[:1]
        if "?" not in asked and not (first and first[0] in QUESTION_WORDS):
            return None
        asked_words = set(_WORDS.findall(asked))
        asked_stems = _stems(asked)
        best = None
        for word in asked_words & hits:
            for anchor, _, order, form in self.by_word[word]:
                if not form.asks or not _mentions(asked, anchor) or not form.norm.startswith(answer):
                    continue
                k = form.next_token(len(answer), statement=False)
                if k is None:
                    continue
                score = (len((asked_stems - _stems(anchor)) & form.words), order)
                if best is None or score > best[0]:
                    best = (score, form, k)
        return (best[1], best[2], "question") if best else None

    def statement(self, view):
        """(form, k, how) where the text names a subject and goes on as its label does, or None."""
        q, hits, at_start = view
        best = None
        for word in hits:
            for anchor, end, order, form in self.by_word[word]:
                for i in _mentions(q, anchor, every=True):
                    found = form.after_subject(q[i + len(anchor):], anchor, end)
                    # the furthest into its label, then the newest label, then the whole subject
                    if found is not None and (best is None or (found[0], order, len(anchor)) > best[0]):
                        k, how = found
                        best = ((k, order, len(anchor)), form, k, "+".join(how) or "normalized")
        if best is None and at_start and self.starts:
            text = q if q.startswith(" ") else " " + q
            for order, form in self.starts:
                if len(text) >= form.start_at and form.norm.startswith(text):
                    k = form.next_token(len(text))
                    if k is not None and (best is None or (len(text), order, 0) > best[0]):
                        best = ((len(text), order, 0), form, k, "text_start")
        return best[1:] if best else None


def _stems(text):
    """The content words of text, cut to four letters ("lives" and "live" meet): how much a
    question and a label share."""
    return {w[:4] for w in _WORDS.findall(text) if w not in STOP_WORDS}


def _mentions(text, anchor, every=False):
    """Where `anchor` occurs in text as whole words (last first, at most 3); with every=False,
    whether it occurs at all."""
    found, end = [], len(text)
    while len(found) < 3:
        i = text.rfind(anchor, 0, end)
        if i < 0:
            break
        j = i + len(anchor)
        if (i == 0 or not text[i - 1].isalnum()) and (j == len(text) or not text[j].isalnum()):
            found.append(i)
        end = j - 1
    return found if every else bool(found)
