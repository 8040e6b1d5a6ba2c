"""phonebind's services on a grpc.aio server: each method behind the interceptors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from .interceptors import Chain, lenient

RunInStore = Callable[..., Awaitable[Any]]


def register(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object, chain: Chain
) -> None:
    """Serves every method of `service` with the servicer's method of the same name,
    which takes (request, CallContext)."""
    handlers = {}
    for method in service.methods:
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        path = f"/{service.full_name}/{method.name}"
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            chain.handler(path, getattr(servicer, method.name)),
            request_deserializer=lenient(request.FromString),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
