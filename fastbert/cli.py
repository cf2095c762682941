"""The `fastbert` command (also `python -m fastbert`): vocab, pretrain, finetune.

    fastbert vocab --corpus FILE [--vocab-size 8000] [--out vocab.txt]
    fastbert pretrain [options]      (no options: embedded corpus, small model; see --help)
    fastbert finetune --checkpoint CKPT [--train FILE] [--task sequence|token]
                      [--from-scratch | --compare-scratch] [--seeds S ...]
    fastbert --version

`fastbert <command> -h` lists each command's options.
"""

import argparse
import sys


def _vocab(argv):
    from fastbert.train.data import CorpusError
    from fastbert.train.pretrain import DEFAULT_CORPUS
    from fastbert.train.vocab import SPECIALS, VocabError, read_vocab, train_vocab

    p = argparse.ArgumentParser(prog="fastbert vocab", description="Train a WordPiece vocabulary with the "
                                "tokenizers library, or convert a bert_pytorch WordVocab pickle / vocab.txt. "
                                "The trainer breaks count ties in hash order (huggingface/tokenizers#1794): "
                                "two trainings on the same text can differ in a few tokens, so keep the "
                                "file and pass it with --vocab to reproduce a run.")
    p.add_argument("--corpus", nargs="+", default=[DEFAULT_CORPUS], help="text files (default: embedded)")
    p.add_argument("--from", dest="src", help="convert this bert_pytorch pickle or vocab.txt instead")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--cased", action="store_true")
    p.add_argument("--out", default="vocab.txt")
    args = p.parse_args(argv)
    try:
        if args.src:
            v = read_vocab(args.src, lowercase=not args.cased)
        else:
            if args.vocab_size <= len(SPECIALS):
                raise VocabError(f"--vocab-size {args.vocab_size} leaves no room beside the special tokens")
            v = train_vocab(args.corpus, args.vocab_size, args.min_frequency, lowercase=not args.cased)
        v.save(args.out)
    except (CorpusError, VocabError) as e:
        print(f"fastbert vocab: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(v)} tokens ({v.kind}) to {args.out}; [PAD]={v.pad_id} [UNK]={v.unk_id} "
          f"[CLS]={v.cls_id} [SEP]={v.sep_id} [MASK]={v.mask_id}")
    return 0


def _version():
    from fastbert.train.runlog import versions

    v = versions()
    others = ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "transformers", "python") if k in v)
    print(f"fastbert {v['fastbert']} ({others})")
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("vocab", "pretrain", "finetune")
    if argv and argv[0] in ("--version", "-V"):
        return _version()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print(__doc__)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"fastbert: error: unknown command {argv[0]!r}; expected one of {commands}",
                  file=sys.stderr)
            return 2
        return 0
    cmd, rest = argv[0], argv[1:]
    try:
        return _run(cmd, rest)
    except KeyboardInterrupt:  # Ctrl-C outside training's own handling (loading torch, vocab): no traceback
        print(f"fastbert {cmd}: SIGINT outside training (while loading, or in vocab): stopped",
              file=sys.stderr)
        return 130  # 128 + SIGINT, as a signal during training


def _run(cmd, rest):
    if cmd == "vocab":
        return _vocab(rest)
    if cmd == "pretrain":
        from fastbert.train.pretrain import main as pretrain

        return pretrain(rest)
    from fastbert.train.finetune import main as finetune

    return finetune(rest)


if __name__ == "__main__":
    sys.exit(main())
