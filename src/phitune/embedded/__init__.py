"""The embedded default: ``phitune demo`` (demo.py) fine-tunes the tiny Phi-3-architecture model in ``assets/`` on the
bundled chat data and shows what it learned. (Named ``embedded``, not ``demo``, so the package never shadows the public
function ``phitune.demo``.)
"""
