"""Write chatforge's own demo data set into src/chatforge/data/demo/.

Every sentence here was written for chatforge (no copied data). The demo teaches a small
assistant, "Forge", to answer everyday questions concisely and concretely. Preference data
contrasts a good answer with three typical failures of small chat models, the ones the
seed projects reported: vague filler, repetition loops, and answers to a different question.

    sft.jsonl       Conversation records (incl. a few two-turn chats)
    rank.jsonl      Ranking records, K = 3: good > vague > looping-or-off-topic
    prefs.jsonl     Preference records (good vs one failure), for pairwise RM / DPO
    prompts.jsonl   Prompt records for PPO rollouts (questions not in sft.jsonl)
    heldout.jsonl   Conversation records held out for evaluation (perplexity, win rate)

Run: python scripts/make_demo_data.py   (deterministic; the output is committed)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are Forge, a friendly assistant. Answer concisely and concretely."

# (question, good answer) -- written for chatforge.
QA = [
    ("How do I keep basil fresh?", "Trim the stems and stand the bunch in a glass of water on the counter, like flowers. Keep it out of the fridge: cold turns basil leaves black."),
    ("Why is the sky blue?", "Sunlight is scattered by the air, and short blue wavelengths scatter far more than red ones. So blue light reaches your eyes from every direction of the sky."),
    ("How long should I boil an egg for a soft yolk?", "Lower the egg into boiling water and cook it for six to seven minutes. Then cool it in cold water for a minute so it stops cooking."),
    ("What is a good way to start learning to code?", "Pick one language, such as Python, and build tiny projects you care about: a to-do list, a quiz, a budget tracker. Write a little code every day."),
    ("How can I fall asleep faster?", "Go to bed at the same time every night, keep the room dark and cool, and put your phone away an hour before sleep. Avoid coffee after lunch."),
    ("What is photosynthesis?", "Photosynthesis is how plants make food: they use sunlight to turn water and carbon dioxide into sugar, and release oxygen as a by-product."),
    ("How do I remove a coffee stain from a shirt?", "Rinse the stain from the back with cold water as soon as you can, rub in a drop of dish soap, let it sit for five minutes, then wash as usual."),
    ("What is the difference between weather and climate?", "Weather is what the air does today: rain, sun, wind. Climate is the average of the weather over many years in one place."),
    ("How much water should I drink a day?", "Most adults do well with about six to eight glasses a day, more when it is hot or when you exercise. Pale yellow urine is a good sign."),
    ("How do I make a simple tomato sauce?", "Soften a chopped onion and two cloves of garlic in olive oil, add a can of tomatoes, salt and a pinch of sugar, and simmer for twenty minutes."),
    ("Why do cats purr?", "Cats purr when they are relaxed, but also to calm themselves when stressed or hurt. The sound comes from fast twitches of the muscles in their voice box."),
    ("How do I change a flat bicycle tyre?", "Remove the wheel, lever the tyre off the rim, and pull out the tube. Find the hole, patch it or fit a new tube, then refit the tyre and pump it up."),
    ("What is a prime number?", "A prime number is a whole number greater than one that can only be divided evenly by one and itself, like 2, 3, 5, 7 and 11."),
    ("How do I write a good email subject line?", "Say what the email is about and what you need, in under eight words. For example: 'Budget draft: please review by Friday'."),
    ("Why do leaves change colour in autumn?", "As days get shorter, trees stop making green chlorophyll. The yellow and orange pigments that were there all along show through, and some trees make red ones."),
    ("How can I save money on groceries?", "Plan meals for the week, shop with a list, buy store brands, and cook extra to eat as leftovers. Never shop hungry."),
    ("What causes thunder?", "Lightning heats the air around it in a split second, so the air expands explosively. That sudden shock wave is the thunder you hear."),
    ("How do I take care of a cactus?", "Give it bright light, water it only when the soil is completely dry, and use a pot with a drainage hole. Overwatering is what kills most cacti."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra, not Sydney. It was chosen as a compromise between Sydney and Melbourne."),
    ("How do I calm down before an exam?", "Breathe slowly: in for four counts, out for six, a few times. Read each question twice, and start with the one you find easiest."),
    ("What is inflation?", "Inflation is the general rise of prices over time, so the same amount of money buys a little less each year."),
    ("How do I clean a cast iron pan?", "Wipe it out while warm, scrub with hot water and a brush, dry it on the stove, and rub in a thin layer of oil. Skip the dishwasher."),
    ("Why does the moon change shape?", "The moon does not change shape. We see different parts of its sunlit half as it circles the Earth, which gives the phases from new moon to full moon."),
    ("How can I remember names better?", "Repeat the name when you hear it, use it once in the conversation, and link it to a picture in your head. Writing it down later helps too."),
    ("What is a healthy breakfast?", "Combine protein, fibre and some fruit: for example oats with yogurt and berries, or eggs on wholegrain toast with a piece of fruit."),
    ("How do solar panels work?", "Solar panels are made of silicon cells. When sunlight hits a cell it knocks electrons loose, and that flow of electrons is electric current."),
    ("How do I start running as a beginner?", "Start with walk-run intervals: one minute running, two minutes walking, for twenty minutes, three times a week. Add running time slowly."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level. Higher up, where air pressure is lower, it boils at a lower temperature."),
    ("How do I make my phone battery last longer?", "Lower the screen brightness, turn off background refresh for apps you rarely use, and keep the battery between about 20 and 80 percent."),
    ("Why do we have seasons?", "The Earth's axis is tilted. For half the year one hemisphere leans towards the sun and gets more direct light and longer days: that is its summer."),
    ("How can I be more productive at work?", "Do your most important task first, before email. Work in focused blocks of 25 to 50 minutes with short breaks, and keep one list of tasks."),
    ("What is a noun?", "A noun is a word for a person, place, thing or idea, such as teacher, Paris, chair or freedom."),
    ("How do I grow tomatoes on a balcony?", "Use a large pot, at least 20 litres, with good compost. Give the plant six hours of sun, a stake to climb, and water every day in summer."),
    ("What does a computer's CPU do?", "The CPU is the computer's main processor. It carries out program instructions one after another: calculations, comparisons and moving data around."),
    ("How do I politely decline an invitation?", "Thank the person, say you cannot make it, and wish them a good time. For example: 'Thank you for inviting me! I can't come, but I hope it goes wonderfully.'"),
    ("Why is exercise good for you?", "Exercise strengthens the heart and muscles, improves sleep and mood, and lowers the risk of many diseases. Even a daily brisk walk helps."),
    ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
    ("How do I cook rice so it is not sticky?", "Rinse the rice until the water runs clear, use about one and a half cups of water per cup of rice, simmer covered for twelve minutes, then let it rest."),
    ("What is gravity?", "Gravity is the pull that masses have on each other. The Earth's gravity keeps us on the ground and keeps the moon in orbit."),
    ("How do I improve my handwriting?", "Slow down, hold the pen loosely, and practise a few lines every day. Copying a neat alphabet for ten minutes a day makes a visible difference in weeks."),
    ("What should I pack for a weekend hike?", "Water, snacks, a rain jacket, a warm layer, sun cream, a map or charged phone, a small first-aid kit and comfortable broken-in shoes."),
    ("How do vaccines work?", "A vaccine shows your immune system a harmless piece or copy of a germ, so it learns to recognise it. If the real germ comes later, your body fights it off faster."),
    ("How do I write a short story?", "Start with a character who wants something, put an obstacle in the way, and end with a change. Keep it to one scene if you are just starting."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet. It is a gas giant more than eleven times wider than the Earth."),
    ("How can I reduce stress?", "Move your body every day, sleep enough, talk to someone you trust, and take short breaks to breathe. Cutting one small obligation can help too."),
    ("How do I keep bread from going stale?", "Keep it in a paper or cloth bag at room temperature for a day or two. For longer, slice it and freeze it, then toast slices straight from frozen."),
    ("What is the speed of light?", "Light travels at about 300,000 kilometres per second in a vacuum. It takes roughly eight minutes to reach us from the sun."),
    ("How do I learn a new language?", "Study a little every day, learn the most common words first, and speak from the start, even badly. Listening to simple podcasts helps a lot."),
    ("Why do onions make you cry?", "Cutting an onion releases a gas that irritates your eyes, so they make tears to wash it away. A sharp knife and a chilled onion reduce it."),
    ("How do I back up my photos?", "Keep at least two copies in different places: for example one on an external drive and one in a cloud service. Set it to run automatically."),
    ("What is a verb?", "A verb is a word for an action or a state, such as run, think or be."),
    ("How do I fix a squeaky door?", "Lift the hinge pin a little, put a few drops of oil or a dab of petroleum jelly on it, and swing the door back and forth to spread it."),
    ("What is DNA?", "DNA is the molecule that carries the instructions for building and running a living thing. It is a long double spiral of four chemical letters."),
    ("How do I make friends in a new city?", "Join something that meets regularly: a sports club, a class or a volunteer group. Seeing the same people every week is how friendships form."),
    ("How often should I water houseplants?", "Most houseplants need water when the top two centimetres of soil feel dry. That is often once a week, less in winter."),
    ("What is the tallest mountain in the world?", "Mount Everest, on the border of Nepal and China, is the tallest mountain above sea level at about 8,849 metres."),
    ("How do I prepare for a job interview?", "Research the company, prepare three short stories about your achievements, practise answering common questions out loud, and have two questions ready to ask."),
    ("Why is the ocean salty?", "Rain slowly dissolves minerals from rocks and rivers carry them to the sea. When sea water evaporates, the salt stays behind and builds up."),
    ("How do I make cold brew coffee?", "Mix one part coarse ground coffee with eight parts cold water, leave it in the fridge for twelve to eighteen hours, then strain it."),
    ("What is a black hole?", "A black hole is a place where matter is packed so tightly that its gravity lets nothing escape, not even light."),
    ("How do I stop procrastinating?", "Make the first step tiny, such as opening the document and writing one sentence, and set a timer for ten minutes. Starting is the hardest part."),
    ("How do bees make honey?", "Bees collect nectar from flowers, store it in wax cells, and fan it with their wings until most of the water evaporates. What is left is honey."),
    ("What is the difference between a virus and bacteria?", "Bacteria are tiny living cells that can live on their own; antibiotics can kill them. Viruses are much smaller and can only multiply inside other cells."),
    ("How do I keep my kitchen knives sharp?", "Hone them on a steel before use, cut on a wooden or plastic board, wash them by hand, and sharpen them on a whetstone a few times a year."),
]

# Second turns for a few conversations (multi-turn memory in SFT).
FOLLOW_UPS = {
    "How do I make a simple tomato sauce?": ("Can I freeze it?", "Yes. Let it cool, then freeze it in portions for up to three months. Thaw it in the fridge overnight."),
    "What is a prime number?": ("Is 1 a prime number?", "No. A prime needs exactly two different divisors, and 1 has only one, so it is not prime."),
    "How do I start running as a beginner?": ("What shoes should I buy?", "Buy running shoes that fit comfortably with a thumb's width of space at the toe. Try them on in the afternoon, when feet are largest."),
    "What is the capital of Australia?": ("And of Canada?", "The capital of Canada is Ottawa, in the province of Ontario."),
    "How can I fall asleep faster?": ("What if I wake up at night?", "Keep the lights low and don't check the time. If you are still awake after twenty minutes, get up and read something calm until you feel sleepy."),
}

# Questions only used as RL prompts (never seen with an answer).
RL_ONLY = [
    "How do I keep my bike chain clean?", "What is a good stretch for a stiff neck?", "How do I write a thank-you note?",
    "Why do stars twinkle?", "How do I store fresh herbs?", "What is compound interest?", "How do I brew green tea?",
    "What is an adjective?", "How can I drink more water during the day?", "How do I plan a small garden?",
    "Why do birds migrate?", "How do I prepare for a long flight?", "What is renewable energy?",
    "How do I make pancakes?", "What is the Milky Way?", "How can I make my room tidier?", "Why do we dream?",
    "How do I start a vegetable compost?", "What is a recipe for a quick lunch?", "How do I learn to juggle?",
    "How do I choose a good book?", "What makes a rainbow?", "How can I be a better listener?", "How do volcanoes form?",
    "How do I keep cut flowers fresh longer?", "What is an atom?", "How do I get better at chess?",
    "How do I care for a new puppy?", "Why is sleep important?", "How do I make a budget?",
]

VAGUE = [
    "That is a great question. There are many different things to consider, and the answer really depends on your situation. It is important to think about it carefully and do what feels right for you.",
    "Well, it depends. Everyone is different, so there is no single answer. You should look into it more and consider all of the factors before deciding anything.",
    "This is an interesting topic that many people wonder about. There are lots of opinions and ideas about it, and it can be quite complicated in the end.",
    "It is hard to say for sure. Many things can affect it, and it might be different in different cases. I would suggest thinking about what matters most to you.",
]


def looping(answer: str, rng: random.Random) -> str:
    """A degenerate answer: the first clause repeated, as small models do when they loop."""
    words = answer.split()
    k = rng.randint(4, 7)
    chunk = " ".join(words[:k]).rstrip(".,:;")
    return " ".join([chunk] * rng.randint(4, 6)) + " " + chunk


def conv(question: str, answer: str, extra: tuple[str, str] | None = None, idx: int = 0, system: bool = True) -> dict:
    msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if extra:
        msgs += [{"role": "user", "content": extra[0]}, {"role": "assistant", "content": extra[1]}]
    return {"kind": "conversation", "messages": msgs, "meta": {"source": "chatforge-demo", "id": f"demo-{idx}"}}


def main() -> None:
    rng = random.Random(0)
    out = Path(__file__).resolve().parents[1] / "src" / "chatforge" / "data" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    items = list(enumerate(QA))
    rng.shuffle(items)
    heldout, train = items[:10], items[10:]

    def write(name: str, rows: list[dict]) -> None:
        with open(out / name, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}: {len(rows)} records")

    sft = [conv(q, a, FOLLOW_UPS.get(q), i, system=(i % 3 != 0)) for i, (q, a) in train]
    write("sft.jsonl", sft)
    write("heldout.jsonl", [conv(q, a, None, i) for i, (q, a) in heldout])

    ranks, prefs = [], []
    for i, (q, a) in train:
        prompt = [{"role": "user", "content": q}]
        other = QA[(i + 17) % len(QA)][1]
        for rep in range(2):  # two rankings per question, different failure texts
            vague = VAGUE[(i + rep) % len(VAGUE)]
            worst = looping(a, rng) if rep == 0 else other
            ranks.append({"kind": "ranking", "prompt": prompt,
                          "responses": [{"role": "assistant", "content": a}, {"role": "assistant", "content": vague},
                                        {"role": "assistant", "content": worst}],
                          "meta": {"source": "chatforge-demo", "id": f"rank-{i}-{rep}"}})
        for j, bad in enumerate([VAGUE[i % len(VAGUE)], looping(a, rng), other]):
            prefs.append({"kind": "preference", "prompt": prompt, "chosen": {"role": "assistant", "content": a},
                          "rejected": {"role": "assistant", "content": bad},
                          "meta": {"source": "chatforge-demo", "id": f"pref-{i}-{j}"}})
    write("rank.jsonl", ranks)
    write("prefs.jsonl", prefs)

    prompts = [{"kind": "prompt", "prompt": [{"role": "user", "content": q}], "meta": {"source": "chatforge-demo"}}
               for q in RL_ONLY] + [
        {"kind": "prompt", "prompt": [{"role": "user", "content": q}], "meta": {"source": "chatforge-demo"}}
        for _, (q, _) in train]
    write("prompts.jsonl", prompts)


if __name__ == "__main__":
    main()
