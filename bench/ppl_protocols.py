"""Float perplexity of the benchmark model under two ways of joining the WikiText-2 test rows.

Run:  python bench/ppl_protocols.py [--windows 40] [--seqlen 512]

Our protocol (`pvq eval`, bench/llm_quant.py) joins the dataset rows with blank lines
("\\n\\n".join(rows), as the GPTQ/QuaRot loaders do); some tools concatenate the rows as
they are ("".join(rows)). The first 40 windows of 512 tokens differ between the two, and
so do the perplexities: this prints both, so figures quoted from elsewhere can be placed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from pvq.eval.perplexity import perplexity_details, wikitext2_test_rows
from pvq.models import load_model
from pvq.calibrate import encode_text

RAW = Path(__file__).resolve().parents[2] / "shared" / "assets" / "wikitext-2" / "raw" / "wiki.test.raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--seqlen", type=int, default=512)
    args = parser.parse_args()
    if not RAW.is_file():
        sys.exit(f"WikiText-2 test text not found at {RAW} (../shared beside the checkout)")
    model, tokenizer, _ = load_model(args.model)
    rows = wikitext2_test_rows(RAW)
    print(f"| join | tokens | PPL, first {args.windows} windows of {args.seqlen} |\n|---|---|---|")
    for label, sep in (('"\\n\\n".join(rows) (ours)', "\n\n"), ('"".join(rows)', "")):
        ids = encode_text(tokenizer, sep.join(rows))
        res = perplexity_details(model, ids, seqlen=args.seqlen, max_windows=args.windows, progress=False)
        print(f"| {label} | {ids.numel()} | {res.ppl:.3f} |", flush=True)


if __name__ == "__main__":
    main()
