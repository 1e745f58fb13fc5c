"""durin: a thin, synchronous SDK for Durin's plain HTTP handler contract.

    import durin
    app = durin.Endpoint(durin="http://127.0.0.1:8080", egress="http://127.0.0.1:8081")

    @app.handler("order", "process")
    def process(ctx, order):
        charge = ctx.http("POST", "http://pay.internal/charge", json=order).raise_for_status()
        return {"charge": charge.json()}

    app.serve(port=9080)

See README.md for every primitive, and openapi/plain-http.md for the contract.
"""
from .context import (TIMED_OUT, Awakeable, Cancelled, Context, DurinError, Failure,
                      Response, TerminalError, Update, Winner)
from .endpoint import Endpoint
from .signature import SignatureError, Verifier

__all__ = ["Endpoint", "Context", "TIMED_OUT", "Awakeable", "Cancelled", "DurinError",
           "Failure", "Response", "TerminalError", "Update", "Winner", "SignatureError", "Verifier"]
