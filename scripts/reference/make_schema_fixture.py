"""Fixture for json_schema constrained decoding: schemas (the subset qlora serve enforces) and texts labelled valid or
invalid by the `jsonschema` package (Draft 2020-12), the reference the Swift matcher is checked against.

For each schema: values made from the schema (json.dumps, compact and indented), then mutations of each (a required key
dropped, a key added, a value of another type, an array item added or removed, a byte cut off, an integer given a
fraction...), each labelled by jsonschema on json.loads of the text (a text that does not parse is invalid). The Swift
test feeds every text to JSONSchemaMatcher: a valid text must be taken whole and be complete; an invalid one must be
refused at some byte or left incomplete.

Usage: python scripts/reference/make_schema_fixture.py Tests/QLoRATokenizerTests/Resources/json_schema_cases.json
"""
import json
import random
import sys

import jsonschema

SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "email": {"type": ["string", "null"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "weather": {
        "title": "Weather",
        "type": "object",
        "properties": {
            "city": {"type": "string", "description": "where"},
            "unit": {"enum": ["celsius", "fahrenheit", "kelvin"]},
            "temperature": {"type": "number"},
            "ok": {"type": "boolean"},
        },
        "required": ["city", "unit", "temperature", "ok"],
        "additionalProperties": False,
    },
    "open_object": {
        "type": "object",
        "properties": {"id": {"type": "integer"}},
        "required": ["id"],
    },
    "typed_extras": {
        "type": "object",
        "properties": {"a": {"const": 1}},
        "additionalProperties": {"type": "number"},
    },
    "matrix": {
        "type": "object",
        "properties": {
            "rows": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
                     "minItems": 1, "maxItems": 3},
        },
        "required": ["rows"],
        "additionalProperties": False,
    },
    "choice": {
        "anyOf": [
            {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}}, "required": ["kind", "r"],
             "additionalProperties": False},
            {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"}, "h": {"type": "number"}},
             "required": ["kind", "w", "h"], "additionalProperties": False},
        ]
    },
    "tree": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"value": {"type": "integer"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
                "required": ["value"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "escapes": {
        "type": "object",
        "properties": {
            "quote\"d": {"enum": ["a\"b", "tab\there", "é", "plain", None, 3, True]},
            "x": {"type": "string"},
        },
        "required": ["quote\"d"],
        "additionalProperties": False,
    },
    "top_array": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 4},
}


def instance(schema, rng, root, depth=0):
    """A value of `schema` (the subset above)."""
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            if part:
                target = target[part]
        return instance(target, rng, root, depth + 1)
    if "anyOf" in schema:
        return instance(rng.choice(schema["anyOf"]), rng, root, depth)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    t = schema.get("type")
    if isinstance(t, list):
        t = rng.choice(t)
    if t == "object":
        props = schema.get("properties", {})
        out = {}
        for k, s in props.items():
            if k in schema.get("required", []) or rng.random() < 0.5:
                out[k] = instance(s, rng, root, depth + 1)
        extra = schema.get("additionalProperties", True)
        if extra is not False and rng.random() < 0.5:
            out["extra_%d" % rng.randint(0, 9)] = instance(extra if isinstance(extra, dict) else {"type": "string"}, rng, root, depth + 1)
        return out
    if t == "array":
        lo, hi = schema.get("minItems", 0), schema.get("maxItems", 4)
        if depth > 4:
            hi = lo
        return [instance(schema.get("items", {"type": "integer"}), rng, root, depth + 1) for _ in range(rng.randint(lo, hi))]
    if t == "string":
        return rng.choice(["", "x", "Zürich", "a \"q\" b", "line\nbreak", "back\\slash", "tab\t", "\u00e9t\u00e9", "emoji \U0001F600"])
    if t == "integer":
        return rng.choice([0, 7, -3, 42, 100000])
    if t == "number":
        return rng.choice([0, 1.5, -2.25, 3e10, 12, -0.001])
    if t == "boolean":
        return rng.choice([True, False])
    if t == "null":
        return None
    return rng.choice([1, "s", None])


def mutations(value, rng):
    """Changed copies of a value: some break the schema, some do not (jsonschema labels them)."""
    out = []
    if isinstance(value, dict):
        for k in list(value):
            d = dict(value)
            del d[k]
            out.append(d)
            d = dict(value)
            d[k] = rng.choice(["text", 1, 2.5, None, True, [], {}])
            out.append(d)
        out.append({**value, "unexpected": 1})
        for k, v in value.items():
            for m in mutations(v, rng)[:3]:
                out.append({**value, k: m})
    elif isinstance(value, list):
        out.append(value + value[:1])
        out.append(value[:-1])
        out.append(value + ["zzz"])
        for i, v in enumerate(value[:2]):
            for m in mutations(v, rng)[:2]:
                c = list(value)
                c[i] = m
                out.append(c)
    elif isinstance(value, bool):
        out += [not value, "true"]
    elif isinstance(value, int):
        out += [value + 0.5, str(value), None]
    elif isinstance(value, float):
        out += ["1.5", True]
    elif isinstance(value, str):
        out += [value + "!", 5, None, value.upper()]
    else:
        out += [0, "null"]
    return out


def label(schema, text):
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def main():
    rng = random.Random(1234)
    cases = []
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        texts = {}
        for _ in range(40):
            v = instance(schema, rng, schema)
            # Strings as json.dumps writes them without ensure_ascii (an enum value is matched in that one encoding).
            for t in (json.dumps(v, ensure_ascii=False), json.dumps(v, ensure_ascii=False, indent=2), json.dumps(v, ensure_ascii=False, separators=(",", ":"))):
                texts[t] = True
                texts[t[:-1]] = True  # cut short
                texts[t + "}"] = True
            for m in mutations(v, rng):
                texts[json.dumps(m, ensure_ascii=False)] = True
        items = [{"text": t, "valid": label(schema, t)} for t in sorted(texts)]
        cases.append({"name": name, "schema": schema, "texts": items})
        print(f"{name}: {len(items)} texts, {sum(i['valid'] for i in items)} valid", file=sys.stderr)
    with open(sys.argv[1], "w") as f:
        from importlib.metadata import version
        json.dump({"generator": "scripts/reference/make_schema_fixture.py", "jsonschema": version("jsonschema"), "cases": cases}, f,
                  ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
