"""`gpt2fn generate`: the seed's run_inference.py in one line.

    gpt2fn generate --checkpoint gpt2_model.pth "Hello, it is time"
    gpt2fn generate --model gpt2 --temperature 0.8 --top-k 40 --seed 0 --stream Once upon a time

Prints the prompt followed by the model's continuation (streamed piece by piece with --stream).
"""

import argparse
import sys

from ..cli import CLIError, add_model_options, device_option, dtype_option, load_model

HELP = "continue a prompt with a model (greedy by default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser, preset=False)  # --seed seeds the sampling here
    parser.add_argument("--max-new-tokens", type=int, default=20, metavar="N", help="tokens to add (default 20)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 is greedy (default); above 0 samples")
    parser.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely ids")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample from the smallest set of ids with probability >= P, in (0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=None, metavar="R",
                        help="> 1 discourages ids already in the text")
    parser.add_argument("--min-p", type=float, default=None, metavar="P",
                        help="sample only ids with probability >= P x the top one's, P in [0, 1]")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                        help="never repeat an N-gram of the text")
    parser.add_argument("--num-beams", type=int, default=1, metavar="K",
                        help="beam search with K beams (as transformers' num_beams; greedy, default 1: none)")
    parser.add_argument("--length-penalty", type=float, default=1.0, metavar="L",
                        help="beam search: scores are divided by length ** L (default 1)")
    parser.add_argument("--seed", type=int, default=None, metavar="S", help="fixed seed: the same text every time")
    parser.add_argument("--stop", action="append", default=None, metavar="TEXT",
                        help="stop before this text (repeatable)")
    parser.add_argument("--no-eos", action="store_true", help="do not stop at <|endoftext|>")
    parser.add_argument("--stream", action="store_true", help="print the text as it is generated")
    parser.add_argument("--compile", action="store_true",
                        help="run the decode step through torch.compile (same tokens; compiles once, seconds)")
    parser.add_argument("prompt", nargs="+", metavar="PROMPT", help="the prompt (several words are joined by spaces)")


def run(args: argparse.Namespace) -> int:
    from ..generate import generate, stream
    from ..sampling import SamplingOptions

    prompt = " ".join(args.prompt)
    if not prompt:
        raise CLIError("the prompt is empty; give some text to continue")
    if args.max_new_tokens < 0:
        raise CLIError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    # bad values fail early, before loading
    SamplingOptions(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.min_p,
                    args.no_repeat_ngram_size)
    if args.num_beams < 1:
        raise CLIError(f"--num-beams must be >= 1, got {args.num_beams}")
    if args.num_beams > 1 and args.stream:
        raise CLIError("--stream shows one growing text; beam search (--num-beams > 1) has several: drop one")
    if args.stop is not None and not all(args.stop):
        raise CLIError("--stop needs a non-empty text")
    params, _ = load_model(args, device=device_option(args), dtype=dtype_option(args))
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                   eos=not args.no_eos, compile=args.compile, min_p=args.min_p,
                   no_repeat_ngram_size=args.no_repeat_ngram_size)
    beams = dict(num_beams=args.num_beams, length_penalty=args.length_penalty) if args.num_beams > 1 else {}
    if args.stream:
        sys.stdout.write(prompt)
        sys.stdout.flush()
        for piece in stream(params, prompt, **options):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    else:
        print(prompt + generate(params, prompt, **options, **beams))
    return 0
