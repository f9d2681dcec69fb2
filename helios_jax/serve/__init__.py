"""``helios-jax serve``: generation streamed to a browser and steered while it runs (docs/serving.md).

Its modules, each imported only when used (Starlette and uvicorn are the optional extra ``serve``): ``protocol``
(messages and limits), ``scheduler`` (one generation at a time, the bounded queue), ``fmp4`` (chunks as fragmented
MP4), ``app`` (the routes), ``command`` (the CLI's flags, the bind's safety, the warm-up) and ``index.html``.
"""
