"""python -m policies: regenerate the committed example policies."""

from policies import regenerate

for path in regenerate():
    print(f"wrote {path}")
