"""`python -m sdnb.tiny DIR [--full-size]`: write the embedded default (tiny models and shipped images) into DIR, or
with --full-size random-initialised models of the real shapes (SD v1.5, BLIP-base, CLIP ViT-L/14). A thin alias of
`sdnb.demo.tiny` and `sdnb.demo.fullsize`, kept so the command stays short."""

from sdnb.demo.fullsize import main

if __name__ == "__main__":
    main()
