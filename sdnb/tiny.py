"""`python -m sdnb.tiny DIR`: write the embedded default (tiny models and shipped images) into DIR. A thin alias of
`sdnb.demo.tiny`, kept so the command stays short."""

from sdnb.demo.tiny import main

if __name__ == "__main__":
    main()
