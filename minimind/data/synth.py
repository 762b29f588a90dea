"""The built-in synthetic corpus (`minimind synth`): bilingual, deterministic, and learnable by a tiny model.

Everything is drawn from three sources of structure a small model can pick up and we can score:
arithmetic (addition and subtraction up to 20, the times table up to 12), facts about a generated world
(people with a city, job, favourite colour, pet and age; places with a kind), and short instructions
with one right answer (reverse, repeat, count, sort, translate, capitalise). Each appears in English
and Chinese. `write_corpus` writes every format of SPEC §3; the world depends only on the seed and
`scale` only changes how many lines are drawn from it.

Held out of every file, for every seed, so that a model can be scored on what it never saw
(`held_out_prompts`, `arithmetic_prompts`):
- arithmetic: a fixed tenth of the problem space, by (op, a, b) (`is_held_out`); the problem never
  appears in any file, in any phrasing or language.
- facts: a fixed fifth of the (person, fact kind) pairs (`is_held_out_fact`). Such a fact is stated in
  the pretraining bios and place descriptions like any other, but no file asks it (no Q/A, DPO pair,
  rlaif prompt or multiple-choice row; reason.jsonl's "who is older" reasoning states ages as the bios
  do): answering it needs recall of what pretraining said, put in the answer format SFT taught on the
  other facts.
- instructions: a fixed tenth of the instruction prompts, by their text (`is_held_out_text`).
"""

import csv
import json
import random
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from minimind.faults import partial_output, tree_bytes, writing

# lines per file at scale 1.0 (the `make demo` default); each file keeps at least its minimum
SIZES = {
    "pretrain": (20000, 200),
    "sft": (8000, 100),
    "dpo": (2000, 40),
    "reason": (2000, 40),
    "lora_identity": (400, 20),
    "rlaif": (1000, 20),
    "eval_choice": (300, 20),
}

EN_SYLLABLES = ("ka", "ren", "mi", "lo", "sa", "ta", "no", "vi", "ra", "del", "an", "to", "ma", "li", "ber", "sun")
EN_SURNAMES = ("Lin", "Hart", "Moss", "Reed", "Vale", "Cole", "Ford", "Lane", "Penn", "Shaw", "Wren", "Yates")
ZH_SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭林何高罗"
ZH_GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰涛明超秀霞平刚桂英华玉兰"
PLACE_EN = (("River", "Stone", "Maple", "Cloud", "Pine", "Lake", "Sun", "Iron"),
            ("ton", "field", "ford", "haven", "wick", "bury"))
PLACE_ZH = ("青石", "白云", "枫叶", "松林", "湖光", "向阳", "铁山", "清水", "金沙", "红河")
PLACE_KINDS = (("a town by a river", "一个河边的小镇"), ("a village in the mountains", "一个山里的村子"),
               ("a city by the sea", "一座海边的城市"), ("a town in the desert", "一个沙漠里的小镇"),
               ("a village near a forest", "一个森林旁的村子"))
JOBS = (("teacher", "老师"), ("doctor", "医生"), ("farmer", "农民"), ("baker", "面包师"), ("engineer", "工程师"),
        ("painter", "画家"), ("driver", "司机"), ("nurse", "护士"), ("fisher", "渔民"), ("singer", "歌手"))
COLOURS = (("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("white", "白色"),
           ("black", "黑色"), ("purple", "紫色"), ("orange", "橙色"))
PETS = (("cat", "猫", "只"), ("dog", "狗", "只"), ("rabbit", "兔子", "只"), ("parrot", "鹦鹉", "只"),
        ("goldfish", "金鱼", "条"), ("turtle", "乌龟", "只"))
WORDS = (("apple", "苹果"), ("water", "水"), ("book", "书"), ("tree", "树"), ("moon", "月亮"), ("sun", "太阳"),
         ("house", "房子"), ("bird", "鸟"), ("flower", "花"), ("rain", "雨"), *[(c[0], c[1]) for c in COLOURS],
         *[(p[0], p[1]) for p in PETS])
SYSTEMS = ("You are a helpful assistant.", "You are MiniMind, a small and friendly language model.",
           "你是一个乐于助人的助手。", "你是MiniMind，一个小型语言模型。请简洁地回答。")


@dataclass(frozen=True)
class Place:
    en: str
    zh: str
    kind: int


@dataclass(frozen=True)
class Person:
    en: str
    zh: str
    city: int
    job: int
    colour: int
    pet: int
    age: int


@dataclass(frozen=True)
class World:
    places: tuple
    people: tuple


def make_world(seed: int, n_places: int = 10, n_people: int = 40) -> World:
    """The generated world for a seed: places, and people who live in them (unique names in both languages)."""
    rng = random.Random(f"minimind-world-{seed}")
    en_places = rng.sample([a + b for a in PLACE_EN[0] for b in PLACE_EN[1]], n_places)
    zh_places = rng.sample([a + b for a in PLACE_ZH for b in "镇村城"], n_places)
    places = tuple(Place(en, zh, rng.randrange(len(PLACE_KINDS))) for en, zh in zip(en_places, zh_places))
    en_names, zh_names = set(), set()
    people = []
    while len(people) < n_people:
        first = "".join(rng.choice(EN_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        en = f"{first} {rng.choice(EN_SURNAMES)}"
        zh = rng.choice(ZH_SURNAMES) + "".join(rng.choice(ZH_GIVEN) for _ in range(rng.choice((1, 2))))
        if en in en_names or zh in zh_names:
            continue
        en_names.add(en)
        zh_names.add(zh)
        people.append(Person(en, zh, rng.randrange(n_places), rng.randrange(len(JOBS)), rng.randrange(len(COLOURS)),
                             rng.randrange(len(PETS)), rng.randrange(18, 80)))
    return World(places, tuple(people))


# --- arithmetic ----------------------------------------------------------------------------------------------

OPS = ("+", "-", "*")
ZH_OPS = {"+": "加", "-": "减", "*": "乘以"}
EN_OPS = {"+": "plus", "-": "minus", "*": "times"}


def is_held_out(op: str, a: int, b: int) -> bool:
    """A fixed ~10% of problems, never written by write_corpus (any seed); arithmetic_prompts draws from them."""
    return zlib.crc32(f"{op}{a},{b}".encode()) % 10 == 0


# Operands: a tiny model learns sums this size, and which it has not seen, within `make demo`'s minutes;
# with operands up to 99 (10,000 sums) it had not even learnt the ones it had seen (BENCHMARKS.md).
MAX_OPERAND = {"+": 20, "-": 20, "*": 12}


def _operands(rng: random.Random, op: str) -> tuple[int, int]:
    a, b = rng.randint(0, MAX_OPERAND[op]), rng.randint(0, MAX_OPERAND[op])
    return (max(a, b), min(a, b)) if op == "-" else (a, b)


def problem(rng: random.Random, held_out: bool = False) -> tuple[str, int, int, int]:
    """(op, a, b, result) from the training part of the problem space (or the held-out part)."""
    while True:
        op = rng.choice(OPS)
        a, b = _operands(rng, op)
        if is_held_out(op, a, b) == held_out:
            return op, a, b, _apply(op, a, b)


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _arith_question(rng: random.Random, op: str, a: int, b: int, zh: bool) -> str:
    if zh:
        return rng.choice((f"{a}{ZH_OPS[op]}{b}等于多少？", f"计算 {a} {op} {b}。", f"{a}{ZH_OPS[op]}{b}是多少？"))
    return rng.choice((f"What is {a} {op} {b}?", f"Compute {a} {op} {b}.", f"What is {a} {EN_OPS[op]} {b}?"))


def _arith_answer(op: str, a: int, b: int, r: int, zh: bool) -> str:
    return f"{a}{ZH_OPS[op]}{b}等于{r}。" if zh else f"{a} {op} {b} = {r}."


def _rlaif_question(rng: random.Random, op: str, a: int, b: int, zh: bool) -> str:
    suffix = "写出算式和结果。" if zh else " Write the equation and its result."
    return _arith_question(rng, op, a, b, zh) + suffix


def arithmetic_prompts(seed: int, n: int, both_languages: bool = False) -> list[tuple[str, str]]:
    """n distinct (question, answer) pairs from the held-out problems (there are 88): disjoint from every
    corpus file. Each in English or Chinese at random, or, with `both_languages`, in both (2n pairs)."""
    rng = random.Random(f"minimind-heldout-{seed}")
    langs = (False, True) if both_languages else (None,)

    def ask(op, a, b):
        return [_rlaif_question(rng, op, a, b, zh=rng.random() < 0.5 if zh is None else zh) for zh in langs]
    try:
        drawn = _held_out_problems(rng, n, ask)
    except ValueError as e:
        raise ValueError(f"arithmetic_prompts: {e}") from None
    return [(q, str(p[3])) for p, qs in drawn for q in qs]


def _held_out_problems(rng: random.Random, n: int, question) -> list[tuple[tuple, str]]:
    """n distinct held-out problems as ((op, a, b, result), question(op, a, b))."""
    seen, out = set(), []
    for _ in range(n * 200):
        op, a, b, r = problem(rng, held_out=True)
        if (op, a, b) not in seen:
            seen.add((op, a, b))
            out.append(((op, a, b, r), question(op, a, b)))
            if len(out) == n:
                return out
    raise ValueError(f"only {len(out)} distinct held-out problems, asked for {n}")


# --- facts about the world ------------------------------------------------------------------------------------

FACT_KINDS = 5  # city, job, colour, pet, age


def is_held_out_fact(person: Person, kind: int) -> bool:
    """A fixed ~fifth of (person, fact kind) pairs: stated in pretraining, never asked in any file."""
    return zlib.crc32(f"{person.en}|{kind}".encode()) % 5 == 0


def askable_fact(rng: random.Random, world: World) -> tuple[Person, int]:
    """A (person, fact kind) pair that files may ask about: not held out."""
    while True:
        person, kind = rng.choice(world.people), rng.randrange(FACT_KINDS)
        if not is_held_out_fact(person, kind):
            return person, kind


def fact_questions(person: Person, kind: int, zh: bool) -> tuple[str, ...]:
    """Every phrasing of the question about one fact."""
    n, z = person.en, person.zh
    if zh:
        return [(f"{z}住在哪里？", f"{z}住在哪个地方？"), (f"{z}的职业是什么？", f"{z}是做什么工作的？"),
                (f"{z}最喜欢什么颜色？",), (f"{z}养了什么宠物？",), (f"{z}多大了？", f"{z}今年几岁？")][kind]
    return [(f"Where does {n} live?", f"Which place does {n} live in?"),
            (f"What is {n}'s job?", f"What does {n} do for a living?"),
            (f"What is {n}'s favourite colour?",), (f"What pet does {n} have?",), (f"How old is {n}?",)][kind]


def fact_question(rng: random.Random, person: Person, kind: int, zh: bool) -> str:
    return rng.choice(fact_questions(person, kind, zh))


def fact_answer(world: World, person: Person, kind: int, zh: bool) -> str:
    return bio_sentences(world, person, zh)[kind]


def fact_qa(rng: random.Random, world: World, zh: bool) -> tuple[str, str, Person, int]:
    """One question about an askable (not held-out) fact: question, correct answer, person, fact kind."""
    person, kind = askable_fact(rng, world)
    return fact_question(rng, person, kind, zh), fact_answer(world, person, kind, zh), person, kind


def wrong_fact(rng: random.Random, world: World, person: Person, kind: int, zh: bool) -> str:
    """A fluent but false answer to the same question: another person's value of that fact."""
    right = fact_answer(world, person, kind, zh)
    for _ in range(100):
        other = rng.choice(world.people)
        fake = Person(person.en, person.zh, other.city, other.job, other.colour, other.pet, other.age)
        if (wrong := fact_answer(world, fake, kind, zh)) != right:
            return wrong
    return "我不知道。" if zh else "I don't know."


def bio_sentences(world: World, p: Person, zh: bool) -> list[str]:
    city = world.places[p.city]
    job, colour, pet = JOBS[p.job], COLOURS[p.colour], PETS[p.pet]
    if zh:
        return [f"{p.zh}住在{city.zh}。", f"{p.zh}是一名{job[1]}。", f"{p.zh}最喜欢{colour[1]}。",
                f"{p.zh}养了一{pet[2]}{pet[1]}。", f"{p.zh}今年{p.age}岁。"]
    return [f"{p.en} lives in {city.en}.", f"{p.en} is a {job[0]}.", f"{p.en}'s favourite colour is {colour[0]}.",
            f"{p.en} has a {pet[0]}.", f"{p.en} is {p.age} years old."]


# --- instructions ---------------------------------------------------------------------------------------------

def is_held_out_text(prompt: str) -> bool:
    """A fixed ~tenth of instruction prompts, by their text: never written by write_corpus."""
    return zlib.crc32(prompt.encode()) % 10 == 0


def instruction(rng: random.Random, zh: bool, held_out: bool = False) -> tuple[str, str]:
    """A short instruction with exactly one right answer, from the training part (or the held-out part)."""
    while True:
        q, a = _any_instruction(rng, zh)
        if is_held_out_text(q) == held_out:
            return q, a


def _any_instruction(rng: random.Random, zh: bool) -> tuple[str, str]:
    kind = rng.randrange(6)
    words = [w[0] for w in rng.sample(WORDS, rng.randint(3, 5))]
    if kind == 0:
        q = f"把这些词倒过来排列：{' '.join(words)}" if zh else f"Reverse the order of these words: {' '.join(words)}"
        return q, " ".join(reversed(words))
    if kind == 1:
        w, k = rng.choice(WORDS)[0], rng.randint(2, 5)
        return (f"把单词“{w}”重复{k}遍。", " ".join([w] * k)) if zh else (f"Repeat the word '{w}' {k} times.",
                                                                           " ".join([w] * k))
    if kind == 2:
        a = rng.randint(0, 15)
        b = a + rng.randint(2, 6)
        seq = [str(i) for i in range(a, b + 1)]
        return (f"从{a}数到{b}。", "、".join(seq)) if zh else (f"Count from {a} to {b}.", ", ".join(seq))
    if kind == 3:
        nums = rng.sample(range(0, 50), rng.randint(3, 6))
        srt = " ".join(str(x) for x in sorted(nums))
        raw = " ".join(str(x) for x in nums)
        q = f"把这些数字从小到大排序：{raw}" if zh else f"Sort these numbers from small to large: {raw}"
        return q, srt
    if kind == 4:
        en, cn = rng.choice(WORDS)
        return (f"把“{cn}”翻译成英文。", f"“{cn}”的英文是 {en}。") if zh else (f"Translate '{en}' into Chinese.",
                                                                          f"'{en}' in Chinese is {cn}.")
    w = rng.choice(WORDS)[0]
    return (f"把“{w}”写成大写字母。", w.upper()) if zh else (f"Write '{w}' in capital letters.", w.upper())


GREETINGS = (
    ("Hello!", "Hello! I am MiniMind, a small language model. How can I help you?"),
    ("Who are you?", "I am MiniMind, a small language model. I can answer simple questions and do arithmetic."),
    ("你好", "你好！我是MiniMind，一个小型语言模型。有什么可以帮你的吗？"),
    ("你是谁？", "我是MiniMind，一个小型语言模型，可以回答简单的问题，也会做算术。"),
)

LORA_QUESTIONS = ("Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
                  "你是谁？", "你叫什么名字？", "请介绍一下你自己。", "你的名字是什么？")
LORA_ANSWERS = ("I am Lumi, an assistant fine-tuned from MiniMind with LoRA. Nice to meet you!",
                "我是Lumi（露米），一个用LoRA从MiniMind微调出来的助手。很高兴认识你！")


# --- held-out evaluation ------------------------------------------------------------------------------------

FAMILIES = ("arithmetic", "facts", "instructions")


def held_out_prompts(seed: int, n: int = 40) -> list[dict]:
    """Exact-match evaluation lines for every task family and language, none of them asked in any file
    that write_corpus(seed=seed) writes (the module docstring says what is held out for each family).

    rlaif layout (a user turn and its "answer", the full reply SFT teaches for such a question) plus a
    "family" such as "facts/zh": n distinct prompts per family and language, or every held-out fact of
    make_world(seed) where there are fewer.
    """
    world = make_world(seed)
    rng = random.Random(f"minimind-eval-heldout-{seed}")
    facts = [(p, k) for p in world.people for k in range(FACT_KINDS) if is_held_out_fact(p, k)]
    rows = []
    for zh in (False, True):
        lang = "zh" if zh else "en"
        for (op, a, b, r), q in _held_out_problems(rng, n, lambda op, a, b, zh=zh: _arith_question(rng, op, a, b, zh)):
            rows.append(_eval_row(f"arithmetic/{lang}", q, _arith_answer(op, a, b, r, zh)))
        for p, k in rng.sample(facts, min(n, len(facts))):
            rows.append(_eval_row(f"facts/{lang}", fact_question(rng, p, k, zh), fact_answer(world, p, k, zh)))
        asked = set()
        while len(asked) < n:
            q, a = instruction(rng, zh, held_out=True)
            if q not in asked:
                asked.add(q)
                rows.append(_eval_row(f"instructions/{lang}", q, a))
    return rows


def _eval_row(family: str, question: str, answer: str) -> dict:
    return {"family": family, "conversations": _msgs((question, None)), "answer": answer}


# --- the files ------------------------------------------------------------------------------------------------

def _msgs(*pairs, system=None) -> list[dict]:
    out = [{"role": "system", "content": system}] if system else []
    for q, a in pairs:
        out.append({"role": "user", "content": q})
        if a is not None:
            out.append({"role": "assistant", "content": a})
    return out


RLAIF_PHRASING_SHARE = 0.2


def _single_qa(rng: random.Random, world: World) -> tuple[str, str, bool]:
    zh = rng.random() < 0.5
    kind = rng.random()
    if kind < 0.4:
        q, a, _, _ = fact_qa(rng, world, zh)
    elif kind < 0.75:
        op, x, y, r = problem(rng)
        # a share in rlaif's phrasing ("... Write the equation and its result."), the prompts GRPO trains on
        ask = _rlaif_question if rng.random() < RLAIF_PHRASING_SHARE else _arith_question
        q, a = ask(rng, op, x, y, zh), _arith_answer(op, x, y, r, zh)
    elif kind < 0.97:
        q, a = instruction(rng, zh)
    else:
        q, a = GREETINGS[rng.randrange(len(GREETINGS))]
    return q, a, zh


def pretrain_doc(rng: random.Random, world: World) -> dict:
    zh = rng.random() < 0.5
    parts = [_pretrain_piece(rng, world, zh) for _ in range(rng.randint(1, 3))]
    return {"text": ("\n" if rng.random() < 0.5 else " ").join(parts)}


# what a pretraining piece is about, by share of pieces: bios, place descriptions, runs of equations,
# Q/A pairs as SFT asks them, instructions with their answer. Arithmetic needs the most practice: this
# mix took `make demo`'s held-out arithmetic from 17% to 33% over (0.35, 0.15, 0.25, 0.15, 0.10) at equal
# steps, with the facts still recalled (BENCHMARKS.md, "Demo accuracy").
PRETRAIN_MIX = (("bio", 0.25), ("place", 0.10), ("arithmetic", 0.45), ("qa", 0.12), ("instruction", 0.08))


def _pretrain_kind(rng: random.Random) -> str:
    x, edge = rng.random(), 0.0
    for kind, share in PRETRAIN_MIX:
        edge += share
        if x < edge:
            return kind
    return PRETRAIN_MIX[-1][0]


def _pretrain_piece(rng: random.Random, world: World, zh: bool) -> str:
    kind = _pretrain_kind(rng)
    if kind == "bio":
        sents = bio_sentences(world, rng.choice(world.people), zh)
        rng.shuffle(sents)
        return ("" if zh else " ").join(sents[: rng.randint(3, 5)])
    if kind == "place":
        place = rng.choice(world.places)
        who = [p for p in world.people if world.places[p.city] == place][:4]
        k = PLACE_KINDS[place.kind]
        if zh:
            return f"{place.zh}是{k[1]}。" + (f"{'、'.join(p.zh for p in who)}住在{place.zh}。" if who else "")
        return f"{place.en} is {k[0]}." + (f" {', '.join(p.en for p in who)} live in {place.en}." if who else "")
    if kind == "arithmetic":
        eqs = [problem(rng) for _ in range(rng.randint(3, 8))]
        if zh:
            return "".join(_arith_answer(*e, zh=True) for e in eqs)
        return " ".join(f"{a} {op} {b} = {r}." for op, a, b, r in eqs)
    if kind == "qa":
        q, a, _ = _single_qa(rng, world)
        return f"问：{q}答：{a}" if zh else f"Q: {q} A: {a}"
    q, a = instruction(rng, zh)
    return f"{q}答案：{a}" if zh else f"{q} Answer: {a}"


def sft_doc(rng: random.Random, world: World) -> dict:
    system = rng.choice(SYSTEMS) if rng.random() < 0.3 else None
    turns = [_single_qa(rng, world)[:2] for _ in range(rng.choice((1, 1, 1, 2, 3)))]
    return {"conversations": _msgs(*turns, system=system)}


def dpo_doc(rng: random.Random, world: World) -> dict:
    zh = rng.random() < 0.5
    if rng.random() < 0.5:
        q, good, person, kind = fact_qa(rng, world, zh)
        bad = wrong_fact(rng, world, person, kind, zh)
    else:
        op, a, b, r = problem(rng)
        q, good = _arith_question(rng, op, a, b, zh), _arith_answer(op, a, b, r, zh)
        wrong = r + rng.choice((-3, -2, -1, 1, 2, 3, 10))
        bad = _arith_answer(op, a, b, wrong, zh) if rng.random() < 0.8 else ("我不知道。" if zh else "I don't know.")
    prefix = [_single_qa(rng, world)[:2]] if rng.random() < 0.2 else []
    prompt = _msgs(*prefix, (q, None))
    return {"chosen": prompt + [{"role": "assistant", "content": good}],
            "rejected": prompt + [{"role": "assistant", "content": bad}]}


def _two_steps(rng: random.Random) -> tuple[int, int, int]:
    """a, b, c with both a + b and (a + b) - c in the training part of the problem space."""
    while True:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        c = rng.randint(0, a + b)
        if not is_held_out("+", a, b) and not is_held_out("-", a + b, c):
            return a, b, c


def reason_doc(rng: random.Random, world: World) -> dict:
    zh = rng.random() < 0.5
    if rng.random() < 0.6:
        p = rng.choice(world.people)
        a, b, c = _two_steps(rng)
        s, r = a + b, a + b - c
        if zh:
            q = f"{p.zh}有{a}个苹果，又买了{b}个，吃掉{c}个，还剩几个？"
            think, ans = f"开始有{a}个，买了{b}个后是{a}+{b}={s}个，吃掉{c}个后是{s}-{c}={r}个。", f"还剩{r}个苹果。"
        else:
            q = f"{p.en} has {a} apples, buys {b} more and eats {c}. How many apples are left?"
            think, ans = f"{a} + {b} = {s}. Then {s} - {c} = {r}.", f"{p.en} has {r} apples left."
    else:
        p1, p2 = rng.sample(world.people, 2)
        if p1.age == p2.age:
            p2 = next(p for p in world.people if p.age != p1.age)
        older = p1 if p1.age > p2.age else p2
        if zh:
            q = f"{p1.zh}和{p2.zh}谁的年纪更大？"
            think = f"{p1.zh}今年{p1.age}岁，{p2.zh}今年{p2.age}岁，{max(p1.age, p2.age)}大于{min(p1.age, p2.age)}。"
            ans = f"{older.zh}的年纪更大。"
        else:
            q = f"Who is older, {p1.en} or {p2.en}?"
            think = (f"{p1.en} is {p1.age} years old and {p2.en} is {p2.age} years old. "
                     f"{max(p1.age, p2.age)} is more than {min(p1.age, p2.age)}.")
            ans = f"{older.en} is older."
    if rng.random() < 0.2:
        reply = {"role": "assistant", "reasoning_content": think, "content": ans}
    else:
        reply = {"role": "assistant", "content": f"<think>\n{think}\n</think>\n<answer>\n{ans}\n</answer>"}
    return {"conversations": [{"role": "user", "content": q}, reply]}


def lora_doc(rng: random.Random, world: World) -> dict:
    q = rng.choice(LORA_QUESTIONS)
    zh = any("\u4e00" <= ch <= "\u9fff" for ch in q)
    turns = [(q, LORA_ANSWERS[zh])]
    if rng.random() < 0.3:
        turns.append(_single_qa(rng, world)[:2])
    return {"conversations": _msgs(*turns)}


def rlaif_doc(rng: random.Random, world: World) -> dict:
    zh = rng.random() < 0.5
    if rng.random() < 0.7:
        op, a, b, r = problem(rng)
        q, answer = _rlaif_question(rng, op, a, b, zh), str(r)
    else:
        p = rng.choice([p for p in world.people if not is_held_out_fact(p, 0)])
        city = world.places[p.city]
        q, answer = ((f"{p.zh}住在哪里？只回答地名。", city.zh) if zh
                     else (f"Where does {p.en} live? Answer with the place name only.", city.en))
    if rng.random() < 0.2:  # MiniMind's rlaif layout: a trailing reference assistant turn, no "answer"
        return {"conversations": _msgs((q, answer))}
    return {"conversations": _msgs((q, None)), "answer": answer}


def eval_rows(rng: random.Random, world: World, n: int) -> list[list[str]]:
    """C-Eval-style rows: id, question, A, B, C, D, answer letter."""
    rows = []
    for i in range(n):
        zh = rng.random() < 0.5
        if rng.random() < 0.6:
            p, kind = askable_fact(rng, world)
            while kind >= 3:  # city, job, colour: the kinds with a fixed set of options
                p, kind = askable_fact(rng, world)
            pools = [[x.zh if zh else x.en for x in world.places], [j[zh] for j in JOBS], [c[zh] for c in COLOURS]]
            right = pools[kind][[p.city, p.job, p.colour][kind]]
            name = p.zh if zh else p.en
            q = ([f"{name}住在哪里？", f"{name}的职业是什么？", f"{name}最喜欢什么颜色？"] if zh else
                 [f"Where does {name} live?", f"What is {name}'s job?", f"What is {name}'s favourite colour?"])[kind]
            wrong = rng.sample([x for x in pools[kind] if x != right], 3)
        else:
            op, a, b, r = problem(rng)
            q, right = _arith_question(rng, op, a, b, zh), str(r)
            wrong = [str(w) for w in rng.sample([r + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if r + d >= 0], 3)]
        options = [right, *wrong]
        rng.shuffle(options)
        rows.append([str(i), q, *options, "ABCD"[options.index(right)]])
    return rows


WRITERS = {"pretrain": pretrain_doc, "sft": sft_doc, "dpo": dpo_doc, "reason": reason_doc,
           "lora_identity": lora_doc, "rlaif": rlaif_doc}


IDENTIFY_SEEDS = 16  # seeds `identify` recognises
IDENTIFY_LINES = 64  # how far into a file's draws its first line may be (a file filtered from a synth file)


def identify(file) -> int | None:
    """The seed of the synthetic world whose corpus `file` (a jsonl file `write_corpus` wrote, or one
    filtered from it) comes from, recognised by its first line among the first draws of each file kind,
    for seeds below IDENTIFY_SEEDS; None for any other data. The report card uses it to score a run on
    the prompts and text held out of its world."""
    try:
        with open(file, encoding="utf-8") as f:
            first = next((line.strip() for line in f if line.strip()), None)
    except (OSError, UnicodeDecodeError):
        return None
    if first is None:
        return None
    for seed in range(IDENTIFY_SEEDS):
        world = make_world(seed)
        for name, make in WRITERS.items():
            rng = random.Random(f"minimind-{name}-{seed}")
            if any(json.dumps(make(rng, world), ensure_ascii=False) == first for _ in range(IDENTIFY_LINES)):
                return seed
    return None


def validation_docs(seed: int, n: int = 200) -> list[dict]:
    """n pretrain-format documents drawn afresh from the world of `seed` (a generator that `write_corpus`
    never uses): held-out text of the training distribution, for a held-out loss."""
    world, rng = make_world(seed), random.Random(f"minimind-validation-{seed}")
    return [pretrain_doc(rng, world) for _ in range(n)]


def _count(name: str, scale: float) -> int:
    base, minimum = SIZES[name]
    return max(minimum, round(base * scale))


def write_corpus(out: Path, seed: int = 0, scale: float = 1.0, force: bool = False) -> dict[str, Path]:
    """Writes the seven files of SPEC §2 `synth` into `out`; returns {name: path}. Deterministic for (seed, scale).

    A non-empty `out` is refused unless `force`, which overwrites the seven files in it.
    """
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out}: directory is not empty; pass --force to overwrite its files")
    # a failure (a full disk, a signal) removes the files this call began, so it can simply be run again
    with partial_output(out) as begun, writing("the synthetic corpus", out, at_least=True,
                                               need=lambda: sum(map(tree_bytes, begun))):
        out.mkdir(parents=True, exist_ok=True)
        return _write_files(out, seed, scale, begun)


def _write_files(out: Path, seed: int, scale: float, begun: list) -> dict[str, Path]:
    world = make_world(seed)
    paths = {}
    for name, make in WRITERS.items():
        rng = random.Random(f"minimind-{name}-{seed}")
        path = out / f"{name}.jsonl"
        begun.append(path)
        with open(path, "w", encoding="utf-8") as f:
            for _ in range(_count(name, scale)):
                f.write(json.dumps(make(rng, world), ensure_ascii=False) + "\n")
        paths[name] = path
    path = out / "eval_choice.csv"
    begun.append(path)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "A", "B", "C", "D", "answer"])
        w.writerows(eval_rows(random.Random(f"minimind-eval-{seed}"), world, _count("eval_choice", scale)))
    paths["eval_choice"] = path
    return paths


def run(args) -> int:
    """`minimind synth --out DIR [--seed N] [--scale S] [--force]`."""
    try:
        paths = write_corpus(args.out, seed=args.seed, scale=args.scale, force=args.force)
    except (ValueError, OSError) as e:
        print(f"minimind synth: {e}", file=sys.stderr)
        return 2
    print(json.dumps({name: {"path": str(p), "bytes": p.stat().st_size} for name, p in paths.items()}))
    return 0
