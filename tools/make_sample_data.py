"""Write the bundled sample datasets in data/sample/: one small file per source, one per file format.

    oasst_sample.jsonl.gz       oasst_export message trees (ranks, a deleted and a synthetic message,
                                several languages, trees that the filters must drop)
    vicuna_sample.json          ShareGPT conversations
    dolly_sample.parquet        Dolly 15k, Open-Assistant schema (METADATA.CONTEXT)
    gsm_sample.csv              grade-school math instructions
    code_alpaca_sample.jsonl    Code Alpaca

The text is written for this project from templates over a small table of facts, so that a tiny model
trained on it for a few minutes can answer "What is a meme, and what's the history behind this word?".
The output is deterministic for a given --seed.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path

# word, what it means, where it comes from, an example of use
WORDS = [
    ("meme", "an idea, behaviour or style that spreads from person to person within a culture; on the internet it "
     "usually means a funny image, video or phrase that people copy and change as they share it",
     "the biologist Richard Dawkins coined the word in his 1976 book The Selfish Gene. He shortened the Greek word "
     "mimeme, which means something imitated, so that it would sound like gene, because he saw ideas spreading and "
     "changing the way genes do",
     "a picture of a cat with a funny caption that thousands of people copy with new captions is a meme"),
    ("emoji", "a small picture used in text messages to show a feeling or an object",
     "the word is Japanese: e means picture and moji means character. The first set was made by Shigetaka Kurita "
     "in 1999 for Japanese mobile phones",
     "a smiling face at the end of a message is an emoji"),
    ("robot", "a machine that can carry out a series of actions on its own",
     "the word comes from the 1920 Czech play R.U.R. by Karel Capek. His brother Josef suggested it, from the Czech "
     "word robota, which means forced labour",
     "a machine that paints cars in a factory is a robot"),
    ("salary", "a fixed amount of money that a person is paid for their work, usually every month",
     "it comes from the Latin word salarium. Many people link it to sal, the Latin word for salt, and say Roman "
     "soldiers were paid in salt, but historians are not sure that story is true",
     "a teacher who is paid the same amount every month earns a salary"),
    ("quarantine", "a period when people or animals are kept apart so that a disease does not spread",
     "it comes from the Italian quaranta giorni, which means forty days. In the fourteenth century, ships arriving "
     "in Venice had to wait forty days before people could go on land",
     "travellers who stay at home for two weeks after a trip are in quarantine"),
    ("clue", "a piece of information that helps you solve a problem or a mystery",
     "it comes from clew, an old English word for a ball of thread. In the Greek myth, Theseus used a ball of "
     "thread to find his way out of the labyrinth, so a clew became something that leads you to an answer",
     "a footprint in the garden can be a clue for a detective"),
    ("nice", "pleasant, kind or good",
     "it comes from the Latin nescius, which means ignorant. In English it first meant foolish, later shy, then "
     "precise, and only in the eighteenth century did it come to mean pleasant",
     "a friend who helps you carry your bags is being nice"),
    ("muscle", "a part of the body that tightens and relaxes to make the body move",
     "it comes from the Latin musculus, which means little mouse. The Romans thought a moving muscle under the skin "
     "looked like a small mouse running",
     "the biceps in your upper arm is a muscle"),
    ("podcast", "a series of audio programs that you can download or stream and listen to at any time",
     "the journalist Ben Hammersley suggested the word in 2004 by joining iPod and broadcast",
     "a weekly talk show about history that you listen to on your phone is a podcast"),
    ("spam", "unwanted messages sent to many people at once, usually advertising",
     "the name comes from a 1970 Monty Python sketch in which a group of people sing the name of the tinned meat "
     "Spam again and again until nobody can talk. Early internet users used it for messages that drown out real "
     "conversation",
     "an email that offers you a prize you never asked for is spam"),
    ("hashtag", "a word or phrase after the sign # that groups messages about the same topic",
     "the designer Chris Messina proposed using the sign on Twitter in 2007, and the word joins hash, the name of "
     "the sign, and tag, a label",
     "people who post about a football final might all add the same hashtag"),
    ("boycott", "a refusal to buy, use or take part in something as a protest",
     "it comes from Charles Boycott, a land agent in Ireland. In 1880 the local people refused to work for him or "
     "trade with him, and his name became a word for that kind of protest",
     "people who stop buying from a company that treats workers badly are taking part in a boycott"),
    ("alphabet", "the set of letters used to write a language, in a fixed order",
     "it comes from alpha and beta, the first two letters of the Greek alphabet",
     "the English alphabet has twenty six letters"),
    ("algorithm", "a list of exact steps that solves a problem",
     "it comes from the name of the ninth century Persian mathematician al-Khwarizmi, whose books brought the "
     "decimal number system to Europe",
     "a recipe that tells you each step of baking bread is a kind of algorithm"),
    ("vaccine", "a substance that trains the body to protect itself against a disease",
     "it comes from the Latin vacca, which means cow. Edward Jenner protected people from smallpox in 1796 using "
     "material from cowpox",
     "the flu shot that many people get each autumn is a vaccine"),
    ("calendar", "a system for dividing time into days, weeks, months and years",
     "it comes from the Latin kalendae, the first day of each Roman month, when debts had to be paid",
     "the calendar on the wall shows which day of the month it is"),
    ("sandwich", "two pieces of bread with food between them",
     "it is named after John Montagu, the Fourth Earl of Sandwich, who in the eighteenth century is said to have "
     "eaten meat between bread so that he did not have to stop playing cards",
     "bread with cheese and tomato inside is a sandwich"),
    ("avocado", "a green fruit with a large seed and soft flesh",
     "it comes from the Spanish aguacate, which came from ahuacatl in Nahuatl, the language of the Aztecs",
     "guacamole is made from mashed avocado"),
    ("ketchup", "a thick sauce, today usually made from tomatoes",
     "the word probably comes from a fish sauce from southern China called ke-tsiap. English sailors brought the "
     "idea home, and tomatoes were only added in the nineteenth century",
     "many people put ketchup on their chips"),
    ("internet", "the worldwide network that connects computers so they can share information",
     "the word is short for internetwork, a network of networks. It was used in the 1970s when researchers "
     "connected different computer networks with the TCP/IP protocol",
     "when you read a web page you are using the internet"),
]

DEFINITION_QUESTIONS = [
    "What is a {w}?", "What does the word {w} mean?", "Can you explain what a {w} is?", "Define {w} for me, please.",
    "What is meant by {w}?",
]
HISTORY_QUESTIONS = [
    "What is a {w}, and what's the history behind this word?", "Where does the word {w} come from?",
    "What's the origin of the word {w}?", "What is the history of the word {w}?",
    "Explain the word {w} and its history.", "Who came up with the word {w}?",
]
FOLLOW_UPS = ["Can you give me an example?", "Could you show me how it is used?", "Thanks! What's an example?"]
DEFINITION_ANSWERS = [
    "{W} means {d}.", "A {w} is {d}.", "The word {w} describes {d}.",
]
HISTORY_ANSWERS = [
    "{W} means {d}.\n\nAs for the history, {h}.",
    "A {w} is {d}. The word has an interesting history: {h}.",
    "The word {w} refers to {d}. Historically, {h}.",
    "In short, a {w} is {d}.\n\nHistory: {h}.",
]
EXAMPLE_ANSWERS = ["Sure. For example, {e}.", "Of course: {e}.", "Here is an example: {e}."]

GENERAL = [
    ("What's the Earth total population?",
     "About eight billion people lived on Earth in 2023, according to the United Nations. The number grows more "
     "slowly than it did in the twentieth century."),
    ("Write a story about future of AI development",
     "In the year 2050, a small team of engineers built an assistant that could explain any idea in simple words. "
     "At first people used it to write letters and plan trips. Soon teachers used it to help children who were "
     "stuck on their homework, and doctors used it to read long reports. The team made one rule: the assistant must "
     "always say when it is not sure. Because of that rule, people trusted it, and the future of AI became a story "
     "about working together rather than about machines taking over."),
    ("How do I make a good cup of tea?",
     "Boil fresh water, warm the cup, add one tea bag or a spoon of leaves, pour the water and wait three to five "
     "minutes. Remove the tea, then add milk or lemon if you like."),
    ("Why is the sky blue?",
     "Sunlight contains all colours. When it passes through the air, the short blue waves are scattered in every "
     "direction much more than the long red waves, so blue light reaches our eyes from all parts of the sky."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a leap year?", "A leap year has 366 days. The extra day is the 29th of February."),
]

# (language, question, answer) for trees in other languages; "ja" is outside the sample mix's languages.
FOREIGN = [
    ("de", "Was ist ein Meme?", "Ein Meme ist eine Idee oder ein Bild, das sich im Internet schnell verbreitet. "
     "Das Wort stammt von Richard Dawkins aus dem Jahr 1976."),
    ("de", "Woher kommt das Wort Roboter?", "Das Wort Roboter stammt aus dem Tschechischen: robota bedeutet Arbeit."),
    ("es", "¿Qué es un meme?", "Un meme es una idea o una imagen que se copia y se comparte en internet. La palabra "
     "fue creada por Richard Dawkins en 1976."),
    ("es", "¿De dónde viene la palabra aguacate?", "Viene del náhuatl ahuacatl, la lengua de los aztecas."),
    ("fr", "Qu'est-ce qu'un mème ?", "Un mème est une idée ou une image qui se propage sur internet. Le mot vient de "
     "Richard Dawkins, en 1976."),
    ("ja", "ミームとは何ですか？", "ミームとは、人から人へ広がる考えや画像のことです。"),
]


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def message(rng: random.Random, role: str, text: str, lang: str = "en", **fields) -> dict:
    node = {
        "message_id": f"{rng.getrandbits(64):016x}",
        "user_id": f"user-{rng.randrange(1000)}",
        "created_date": "2023-03-01T12:00:00Z",
        "text": text,
        "role": role,
        "lang": lang,
        "review_count": 3,
        "review_result": True,
        "deleted": False,
        "synthetic": False,
        "rank": None,
        "replies": [],
    }
    node.update(fields)
    return node


def link(parent: dict, replies: list[dict]) -> dict:
    for reply in replies:
        reply["parent_id"] = parent["message_id"]
    parent["replies"] = replies
    if parent["role"] == "prompter" and len(replies) > 1:
        for rank, reply in enumerate(replies):
            reply["rank"] = rank
    return parent


def word_tree(rng: random.Random, word: tuple) -> dict:
    """A prompter question about a word, 1-3 ranked answers, and follow-up turns under the best one."""
    w, d, h, e = word
    fill = dict(w=w, W=capitalize(w), d=d, h=h, e=e)
    history = rng.random() < 0.7
    question = rng.choice(HISTORY_QUESTIONS if history else DEFINITION_QUESTIONS).format(**fill)
    templates = HISTORY_ANSWERS if history else DEFINITION_ANSWERS
    answers = [message(rng, "assistant", t.format(**fill)) for t in rng.sample(templates, rng.randint(1, 3))]
    root = link(message(rng, "prompter", question), answers)
    follow = message(rng, "prompter", rng.choice(FOLLOW_UPS))
    link(answers[0], [follow])
    link(follow, [message(rng, "assistant", rng.choice(EXAMPLE_ANSWERS).format(**fill))])
    return root


def tree(root: dict, state: str = "ready_for_export") -> dict:
    return {"message_tree_id": root["message_id"], "tree_state": state, "prompt": root, "origin": "sample"}


def oasst_trees(rng: random.Random) -> list[dict]:
    trees = []
    for _ in range(3):
        for word in WORDS:
            trees.append(tree(word_tree(rng, word)))
    # the model card's prompt, answered in several phrasings
    meme = WORDS[0]
    fill = dict(w=meme[0], W=capitalize(meme[0]), d=meme[1], h=meme[2], e=meme[3])
    for template in HISTORY_ANSWERS:
        root = message(rng, "prompter", "What is a meme, and what's the history behind this word?")
        trees.append(tree(link(root, [message(rng, "assistant", template.format(**fill))])))
    for question, answer in GENERAL:
        trees.append(tree(link(message(rng, "prompter", question), [message(rng, "assistant", answer)])))
    for lang, question, answer in FOREIGN:
        root = message(rng, "prompter", question, lang=lang)
        trees.append(tree(link(root, [message(rng, "assistant", answer, lang=lang)])))
    # threads the filters must drop: a deleted answer, a synthetic answer, an unreviewed and a growing tree
    w, d, h, e = WORDS[1]
    deleted = message(rng, "assistant", "This answer was removed by a moderator.", deleted=True)
    synthetic = message(rng, "assistant", f"An {w} is a tiny drawing. [synthetic]", synthetic=True,
                        model_name="sample-model")
    good = message(rng, "assistant", f"An {w} is {d}. History: {h}.")
    trees.append(tree(link(message(rng, "prompter", f"Tell me about the word {w}."), [good, deleted, synthetic])))
    trees.append(tree(link(message(rng, "prompter", "Is this tree reviewed?", review_result=False),
                           [message(rng, "assistant", "No, it is not.")])))
    trees.append(tree(link(message(rng, "prompter", "Is this tree finished?"),
                           [message(rng, "assistant", "Not yet.")]), state="growing"))
    rng.shuffle(trees)
    return trees


def vicuna_records(rng: random.Random) -> list[dict]:
    records = []
    for index, (w, d, h, e) in enumerate(WORDS * 2):
        fill = dict(w=w, W=capitalize(w), d=d, h=h, e=e)
        turns = [
            {"from": "human", "value": rng.choice(DEFINITION_QUESTIONS).format(**fill)},
            {"from": "gpt", "value": rng.choice(DEFINITION_ANSWERS).format(**fill)},
            {"from": "human", "value": "And where does the word come from?"},
            {"from": "gpt", "value": capitalize(h) + "."},
        ]
        if index % 5 == 0:  # the dump splits some replies in two and escapes markdown
            turns.append({"from": "gpt", "value": f"In a sentence: \\*{e}\\*."})
        if index % 7 == 0:  # a last question that nobody answered
            turns.append({"from": "human", "value": "Thanks!"})
        records.append({"id": f"sample_{index}", "conversations": turns})
    return records


DOLLY = [
    ("What did Richard Dawkins coin in The Selfish Gene?",
     "The Selfish Gene is a 1976 book by Richard Dawkins.[1] In it he introduced the word meme for a unit of "
     "culture that spreads by imitation.[2][citation needed]",
     "He coined the word meme, meaning a unit of culture that spreads from person to person by imitation."),
    ("Who named the robot?",
     "R.U.R. is a 1920 play by Karel Capek.[3] The word robot was suggested by his brother Josef.[a]",
     "Josef Capek suggested the word robot to his brother Karel for the play R.U.R."),
    ("When was the first emoji set made?",
     "Shigetaka Kurita designed 176 emoji in 1999 for a Japanese mobile internet service.[4, 5]",
     "The first widely used emoji set was made in 1999 by Shigetaka Kurita."),
]
BRAINSTORM = [
    ("Give me three ideas for a rainy afternoon.", "1. Bake bread.\n2. Read a book about history.\n3. Play a board game."),
    ("List some words that came from names of people.", "Boycott, sandwich, algorithm and cardigan all come from "
     "the names of people."),
    ("Suggest a name for a cat.", "You could call your cat Pixel, Biscuit or Luna."),
    ("Classify these as fruit or vegetable: avocado, carrot, apple.", "Avocado: fruit. Carrot: vegetable. Apple: fruit."),
]


def dolly_records(rng: random.Random) -> list[dict]:
    records = []
    for instruction, context, response in DOLLY:
        records.append({"INSTRUCTION": instruction, "RESPONSE": response, "SOURCE": "sample",
                        "METADATA": {"CONTEXT": context, "CATEGORY": "closed_qa"}})
    for w, d, h, e in WORDS:
        records.append({"INSTRUCTION": f"Using the text, explain where the word {w} comes from.",
                        "RESPONSE": capitalize(h) + ".", "SOURCE": "sample",
                        "METADATA": {"CONTEXT": f"{capitalize(w)}: {d}.[{rng.randint(1, 9)}] {capitalize(h)}.",
                                     "CATEGORY": "closed_qa"}})
        records.append({"INSTRUCTION": f"Use the word {w} in a sentence.", "RESPONSE": capitalize(e) + ".",
                        "SOURCE": "sample", "METADATA": {"CONTEXT": "", "CATEGORY": "creative_writing"}})
    for instruction, response in BRAINSTORM:
        records.append({"INSTRUCTION": instruction, "RESPONSE": response, "SOURCE": "sample",
                        "METADATA": {"CONTEXT": "", "CATEGORY": "brainstorming"}})
    return records


NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana", "Ivan", "Jo"]
ITEMS = [("apples", "bag"), ("pencils", "box"), ("cookies", "jar"), ("marbles", "bag"), ("stickers", "sheet")]


def gsm_records(rng: random.Random) -> list[dict]:
    records = []
    for _ in range(60):
        name, other = rng.sample(NAMES, 2)
        item, box = rng.choice(ITEMS)
        boxes, per_box, given = rng.randint(2, 9), rng.randint(3, 12), rng.randint(1, 10)
        total = boxes * per_box
        records.append({
            "INSTRUCTION": f"{name} buys {boxes} {box}s of {item}. Each {box} holds {per_box} {item}. "
                           f"{name} gives {given} {item} to {other}. How many {item} does {name} have left?",
            "RESPONSE": f"{name} has {boxes} * {per_box} = <<{boxes}*{per_box}={total}>>{total} {item}.\n"
                        f"After giving {given} away, {total} - {given} = <<{total}-{given}={total - given}>>"
                        f"{total - given} are left.\n#### {total - given}",
        })
    return records


CODE_TASKS = [
    ("Write a Python function that returns the sum of a list of numbers.", "",
     "def total(numbers):\n    return sum(numbers)"),
    ("Write a function that reverses a string.", "", "def reverse(text):\n    return text[::-1]"),
    ("Write a function that counts the vowels in a string.", "",
     "def count_vowels(text):\n    return sum(ch in 'aeiou' for ch in text.lower())"),
    ("Explain what the following code prints.", "print(len('meme'))", "It prints 4, the number of letters in 'meme'."),
    ("Write a SQL query that selects all rows of the table words.", "", "SELECT * FROM words;"),
    ("Call the OpenAI API to answer a question.", "", "import openai"),  # dropped by the word filter
]


def code_alpaca_records(rng: random.Random) -> list[dict]:
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in CODE_TASKS]
    for w, *_ in WORDS:
        records.append({"instruction": "Write a function that returns the length of the given word.",
                        "input": f"word = '{w}'", "output": f"def word_length(word):\n    return len(word)\n\n"
                                                            f"word_length('{w}')  # {len(w)}"})
        n = rng.randint(2, 6)
        records.append({"instruction": f"Write a Python loop that prints the word {w} {n} times.", "input": "",
                        "output": f"for _ in range({n}):\n    print('{w}')"})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data/sample", help="directory to write the files to (default data/sample)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the template choices")
    args = parser.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)

    with gzip.GzipFile(out / "oasst_sample.jsonl.gz", "wb", mtime=0) as stream:
        for record in oasst_trees(rng):
            stream.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
    (out / "vicuna_sample.json").write_text(json.dumps(vicuna_records(rng), indent=1, ensure_ascii=False) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(dolly_records(rng)), out / "dolly_sample.parquet")
    with open(out / "gsm_sample.csv", "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["INSTRUCTION", "RESPONSE"])
        writer.writeheader()
        writer.writerows(gsm_records(rng))
    with open(out / "code_alpaca_sample.jsonl", "w") as stream:
        for record in code_alpaca_records(rng):
            stream.write(json.dumps(record) + "\n")
    for path in sorted(out.iterdir()):
        print(f"{path}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
