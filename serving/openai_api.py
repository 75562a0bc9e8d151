"""The HTTP API's request and response shapes: OpenAI's where OpenAI has the concept, and its error object.

Validation lives in these schemas, so a bad request is refused with a 400 and a message naming the parameter before
anything runs; FastAPI publishes them in the app's OpenAPI document.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's response_format: the answer is JSON (any object, or one a JSON schema accepts), enforced while
    decoding (tandem/structured.py)."""
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict] = Field(None, description='{"name", "schema", "strict"}, for type json_schema')


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, description="a route (`assistant`), `route@version` or an adapter `name@version`")
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 or absent: greedy decoding")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    user: Optional[str] = Field(None, max_length=256, description="pins the user to one variant of the route")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate exactly max_tokens (benchmarks)")
    response_format: Optional[ResponseFormat] = None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[Message]) -> list[Message]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return messages

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop: up to 4 non-empty strings")
        return stops

    def completion_limit(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1, max_length=8192)
    collection: Optional[str] = Field(None, min_length=1, description="default: store.collection")
    k: int = Field(5, ge=1, description="at most serve.retriever.max_k")
    mode: Literal["dense", "bm25", "hybrid"] = "hybrid"
    filter: str = Field("", max_length=4096, description='a Milvus expression, e.g. meta["topic"] == "Arts"')


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^chatcmpl-[0-9a-f]{32}$", description="the `id` of a chat completion")
    rating: int = Field(ge=-1, le=1, description="-1 bad, 0 neutral, 1 good")
    correction: Optional[str] = Field(None, min_length=1, max_length=32768, description="what the answer should be")
    comment: Optional[str] = Field(None, max_length=4096)


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
            404: "invalid_request_error",
            413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


class APIError(Exception):
    """Raised anywhere in a handler; the app turns it into the OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
