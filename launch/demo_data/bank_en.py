"""Hand-written English sentences for the demo (written for hibari; no third-party text).

Used for the English web pages in the WARCs (dropped by language identification) and for the small English corpus
that trains the stand-in "base" tokenizer and serves as the 10% replay blend.
"""

from __future__ import annotations

CITIES = ["Lisbon", "Toronto", "Melbourne", "Denver", "Edinburgh", "Portland", "Auckland", "Vienna", "Boston",
          "Seattle", "Dublin", "Austin"]
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Laura", "Martin"]

TOPICS: dict[str, list[str]] = {
    "kitchen": [
        "A good soup starts with a slow simmer, so give the onions time to soften before adding the stock.",
        "{name} keeps a small notebook of recipes that worked and the ones that did not.",
        "Bread dough rises faster in a warm kitchen, but a slow rise in the fridge gives a deeper flavour.",
        "Fresh herbs lose their colour quickly, so add them at the very end of cooking.",
        "The market in {city} sells vegetables that were picked the same morning.",
        "Cutting vegetables into pieces of the same size helps them cook evenly.",
        "A sharp knife is safer than a dull one because it does not slip on the skin of a tomato.",
        "Leftover rice can be frozen in small portions and warmed up on a busy evening.",
        "Tasting as you go is the simplest way to avoid adding too much salt.",
        "Cooking with children takes longer, but they are more willing to eat what they helped to make.",
        "A pot of beans on the stove on a Sunday turns into three different meals during the week.",
        "The recipe calls for {n} ingredients, most of which are probably already in your cupboard.",
    ],
    "travel": [
        "We arrived in {city} early in the morning, before the streets filled with visitors.",
        "The regional train runs only once an hour, so it pays to check the timetable in advance.",
        "{name} likes to leave one afternoon of every trip completely unplanned.",
        "Small museums are often the best way to spend a rainy day in a new town.",
        "The old harbour is quiet during the week, and the fishermen are happy to talk about their work.",
        "Packing light means you can walk from the station to the hotel without a taxi.",
        "A paper map shows the shape of the land in a way that a phone screen rarely does.",
        "The ferry to the island can be cancelled in bad weather, so we kept a spare day at the end.",
        "On the last evening we walked along the river and watched the lights come on across the water.",
        "The trip lasted {n} days, and every place we visited left us wanting to come back.",
    ],
    "computing": [
        "Before writing any code, it helps to describe in plain words what the program should do.",
        "An error message usually says exactly where the problem is, if you take the time to read it.",
        "Small tests written early make it much safer to change the code later.",
        "{name} measures first and optimises second, because guesses about speed are often wrong.",
        "Clear names for variables and functions are worth more than long comments.",
        "Version control lets you go back to any earlier state, which makes experiments less risky.",
        "Large files should be processed in pieces instead of being loaded into memory all at once.",
        "A log file is often the only witness of what happened when a long job failed at night.",
        "Configuration belongs in a file, not hidden inside the code where nobody can find it.",
        "The first version of the tool had {n} small parts, each of which could be tested on its own.",
        "Reading code written by other people is one of the fastest ways to learn new habits.",
        "Saving checkpoints during a long training run means that a crash costs minutes, not days.",
    ],
    "garden": [
        "Tomatoes need at least six hours of sun a day to ripen well.",
        "Water the plants in the early morning, when less of it is lost to the heat.",
        "{name} collects seeds from the best flowers every autumn and plants them again in spring.",
        "Fallen leaves make excellent compost if they are turned over every few weeks.",
        "Young plants with dark green leaves and strong stems are usually the healthiest choice.",
        "A tall plant needs support before the first strong wind, not after it.",
        "The community garden in {city} is looked after by volunteers from the neighbourhood.",
        "Weeds are easiest to pull when the soil is still damp after rain.",
        "This year the garden produced {n} kinds of vegetables, and the beans did best of all.",
    ],
    "weather": [
        "The forecast says rain will arrive in the afternoon and the wind will pick up overnight.",
        "Clear winter nights are often the coldest, because the heat escapes into the open sky.",
        "After the storm the air smelled of wet earth and the streets were shining.",
        "In {city} the first frost usually arrives in the middle of autumn.",
        "A ring around the moon is an old sign that rain may be on its way.",
        "The summer was {n} days longer than usual, and the rivers ran low by August.",
        "{name} checks the clouds every morning before deciding whether to cycle to work.",
        "Fog on the coast can lift within an hour once the sun warms the water.",
    ],
}

# titles for the English web pages
PAGE_TITLES = ["Notes from {city}", "A slow weekend in {city}", "What {name} learned this year",
               "Simple habits for better code", "Spring in the garden", "Reading the sky", "Kitchen notes"]
