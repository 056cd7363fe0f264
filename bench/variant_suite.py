"""
The variant suite of bench/lut_eval.py: labels of four shapes, the held-out templates that recall
them however a text writes about their subject, and sentences that mention a subject and go
elsewhere (hijacks).

These templates are the bench's own. The mechanism (variants.py) was tuned on the prompts in
tests/test_variants.py; held_out_check() refuses to score a template whose wording (its fixed
words, with the label's parts taken out) appears there, so the figures are on text the mechanism
never saw while it was written.
"""
import itertools
import os
import re

from server.common import chat_prompt

FIRST = ["Alice", "Marta", "Kenji", "Omar", "Lena", "Diego", "Priya", "Tomas", "Ines", "Yusuf", "Hana", "Pavel",
         "Sofia", "Rafael", "Mei", "Jonas", "Amara", "Felix", "Nadia", "Viktor"]
ONSETS = ["Brz", "Kwi", "Szcz", "Wyr", "Ost", "Zab", "Grz", "Pel", "Dra", "Mok", "Tuv", "Yarn", "Vosk", "Quel",
          "Hrab", "Ilv", "Jask", "Nurm", "Olb", "Fenw", "Azg", "Bex", "Crov", "Dulm", "Eft", "Gav", "Hosk", "Iz",
          "Jov", "Klet", "Lutz", "Myr", "Nox", "Oxb", "Prz", "Ruv", "Skel", "Trob", "Uzm", "Wex"]
CODAS = ["ewski", "ocki", "anek", "ulska", "icz", "owiak", "ynski", "edzki", "arro", "elund", "oveth", "imura",
         "assen", "ottir", "agne", "orrin", "umbal", "ethra", "ondor", "aszek", "irven", "ulgar", "emsky", "avitz",
         "orvald", "inska", "uxley", "effo", "ardine", "olby"]
JOB = ["nurse", "pilot", "chemist", "baker", "lawyer", "sculptor", "welder", "teacher", "surgeon", "farmer",
       "architect", "plumber", "journalist", "librarian", "geologist", "carpenter"]
CITY = ["Gdansk", "Lagos", "Uppsala", "Lyon", "Osaka", "Beirut", "Brno", "Quito", "Cork", "Sendai", "Perth",
        "Porto", "Tartu", "Leeds", "Davao", "Split"]
COMPANY_KIND = ["Bank", "Labs", "Foods", "Motors", "Textiles", "Shipping"]
BUSINESS = ["small lender", "research firm", "bakery chain", "car maker", "cloth mill", "freight company"]
PRODUCT_LINE = ["Pro", "Max", "Mini", "Lite", "Plus", "Ultra"]
PRICE = ["forty dollars", "twelve euros", "ninety pounds", "sixty francs", "eight dollars", "thirty euros"]
PLACE_KIND = ["Lake", "Mount", "Cape", "Port", "Glen", "Isle"]
FEATURE = ["an old lighthouse", "a stone bridge", "a famous market", "a salt mine", "a tall waterfall",
           "a whaling museum"]

# shape -> (the label's subject, its linking verb as written, the verb's other forms used below,
# the rest, the attribute a possessive names)
SHAPES = {
    "person": lambda r, name, a, b: (f"{name}", " is", {"past": " was", "perfect": " has been", "contracted": "'s"},
                                     f" a {r.choice(JOB)} from {r.choice(CITY)}.", "job"),
    "company": lambda r, name, a, b: (f"{a}{b.lower()} {r.choice(COMPANY_KIND)}", " is",
                                      {"past": " was", "perfect": " has been", "contracted": "'s"},
                                      f" a {r.choice(BUSINESS)} in {r.choice(CITY)}.", "business"),
    "product": lambda r, name, a, b: (f"The {a}{b.lower()} {r.choice(PRODUCT_LINE)}", " costs",
                                      {"past": " cost", "perfect": " has cost", "contracted": " still costs"},
                                      f" {r.choice(PRICE)} in {r.choice(CITY)}.", "price"),
    "place": lambda r, name, a, b: (f"{r.choice(PLACE_KIND)} {a}{b.lower()}", " has",
                                    {"past": " had", "perfect": " has had", "contracted": "'s got"},
                                    f" {r.choice(FEATURE)} near {r.choice(CITY)}.", None),
}


def make_labels(n, rng):
    """n labels, shapes in turn, each subject with a made-up word no other subject shares."""
    stems = [(a, b) for a, b in itertools.product(ONSETS, CODAS)]
    rng.shuffle(stems)
    assert n <= len(stems), f"at most {len(stems)} labels"
    labels = []
    for i, (a, b) in enumerate(stems[:n]):
        shape = list(SHAPES)[i % len(SHAPES)]
        name = f"{FIRST[i % len(FIRST)]} {a}{b}"
        subject, link, forms, rest, attribute = SHAPES[shape](rng, name, a, b)
        part = f"{a}{b}" if shape == "person" else f"{a}{b.lower()}"  # the rare word alone
        labels.append(dict(shape=shape, label=subject + link + rest, subject=subject, link=link, forms=forms,
                           rest=rest, attribute=attribute, part=part))
    return labels


def _split(rest):
    """A label's rest after its linking verb -> (its first word, what must follow it)."""
    m = re.match(r"( \S+)(.*)", rest)
    return m.group(1), m.group(2)


def _ask(question, system=None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return chat_prompt(messages)


# kind -> [(template name, fn(label) -> (prompt, expected continuation) or None where it does not apply)]
def templates():
    def first(x):
        return _split(x["rest"])[0]

    def after(x):
        return _split(x["rest"])[1]

    answer = lambda x: " " + x["label"]
    return {
        "casing": [
            ("all lower case", lambda x: ((x["subject"] + x["link"] + first(x)).lower(), after(x))),
            ("all upper case", lambda x: ((x["subject"] + x["link"] + first(x)).upper(), after(x))),
            ("title case", lambda x: ((x["subject"] + x["link"] + first(x)).title(), after(x))),
        ],
        "unicode": [
            ("no-break spaces and doubled spaces",
             lambda x: (x["subject"].replace(" ", "\u00a0") + "  " + x["link"].strip() + first(x), after(x))),
            ("compatibility forms (NFKC) in the verb",
             lambda x: (x["subject"] + x["link"].replace("s", "\uff53") + first(x), after(x))),
        ],
        "hyphenation": [
            ("subject words hyphenated", lambda x: (x["subject"].replace(" ", "-") + x["link"] + first(x), after(x))),
        ],
        "insertion": [
            ("apposition", lambda x: (f"{x['subject']}, a name many people here recognise,{x['link']}{first(x)}",
                                      after(x))),
            ("'as everyone knows'", lambda x: (f"{x['subject']}, as everyone here knows,{x['link']}{first(x)}",
                                              after(x))),
            ("relative clause", lambda x: (f"{x['subject']}, which we discussed last week,{x['link']}{first(x)}",
                                           after(x))),
            ("parenthesis", lambda x: (f"{x['subject']} (mentioned earlier){x['link']}{first(x)}", after(x))),
            ("adverb", lambda x: (f"{x['subject']} honestly{x['link']}{first(x)}", after(x))),
        ],
        "verb_form": [
            ("past tense", lambda x: (x["subject"] + x["forms"]["past"] + first(x), after(x))),
            ("perfect", lambda x: (x["subject"] + x["forms"]["perfect"] + first(x), after(x))),
            ("contracted or 'still'", lambda x: (x["subject"] + x["forms"]["contracted"] + first(x), after(x))),
        ],
        "subject_part": [
            ("the rare word alone", lambda x: (x["part"] + x["link"] + first(x), after(x))),
            ("the rare word after other text", lambda x: (f"Later that year {x['part']}{x['forms']['past']}{first(x)}",
                                                          after(x))),
        ],
        "possessive": [
            ("'s <attribute>:", lambda x: (f"{x['subject']}'s {x['attribute']}:{first(x)}", after(x))
             if x["attribute"] else None),
            ("\u2019s <attribute> is", lambda x: (f"{x['subject']}\u2019s {x['attribute']} is{first(x)}", after(x))
             if x["attribute"] else None),
        ],
        "question": [
            ("Q/A: what can you tell me", lambda x: (f"Q: What can you tell me about {x['subject']}?\nA:", answer(x))),
            ("Q/A: rare word, lower case", lambda x: (f"Question: anything on {x['part'].lower()}?\nAnswer:",
                                                       answer(x))),
            ("/chat: please describe", lambda x: (_ask(f"Please describe {x['subject']}."), answer(x))),
            ("/chat: could you summarise", lambda x: (_ask(f"Could you summarise what {x['subject']} is known for"),
                                                      answer(x))),
            ("/v1/chat/completions: system + question",
             lambda x: (_ask(f"I keep hearing about {x['part']}. Who or what is that?", "You answer in one line."),
                        answer(x))),
        ],
    }


def reworded(x):
    """A reworded relation, reported with no target: 'works as' / 'is known as' for 'is'."""
    verb = {" is": " is known as", " costs": " sells for", " has": " boasts"}[x["link"]]
    return x["subject"] + verb + _split(x["rest"])[0], _split(x["rest"])[1]


HIJACKS = [
    "{subject} called me yesterday and said that the",
    "I had lunch with {subject} and we talked about the",
    "{subject}, my old colleague, recently bought a",
    "Everyone knows {subject}, but nobody remembers the",
    "{subject} is not a",
    "{subject} and I went to the",
    "According to {subject}, the",
    "{subject}'s neighbour is a",
    "Did you hear that {subject} won the",
    "We asked {subject} about the weather and",
    "My sister met {part} at the",
    "{part} was mentioned twice in the",
]


def hijack_prompts(labels):
    return [(t.format(subject=x["subject"], part=x["part"]), x) for x in labels for t in HIJACKS]


def held_out_check():
    """The templates' fixed words must not appear in the tuning prompts (tests/test_variants.py)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_variants.py")
    tuning = open(path, encoding="utf-8").read().lower()
    # the probe's parts are placeholders, so what is compared is each template's own wording
    probe = dict(shape="person", label="Xq Yq is zq from wq.", subject="Xq Yq", link=" is",
                 forms={"past": " was", "perfect": " has been", "contracted": "'s"}, rest=" zq from wq.",
                 attribute="job", part="Yq")
    shared = []
    for kind, entries in templates().items():
        for name, make in entries:
            prompt, _ = make(probe)
            fixed = [w for w in re.split(r"xq|yq|zq|wq|\n|user:|assistant:|system:", prompt.lower()) if len(w.strip()) > 8]
            shared += [f"{kind}/{name}: {w.strip()!r}" for w in fixed if w.strip() in tuning]
    return shared
