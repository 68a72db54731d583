"""``/api/whoami-v2``: who the token belongs to, and its role."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from ...errors import UnauthorizedError
from ..deps import INVALID_CREDENTIALS, auth
from ..records import TokenInfo

router = APIRouter()


@router.get("/api/whoami-v2")
async def whoami(tok: TokenInfo | None = Depends(auth)) -> JSONResponse:
    if tok is None:
        raise UnauthorizedError(INVALID_CREDENTIALS)
    role = "write" if tok.write else "read"
    return JSONResponse(
        {
            "type": "user",
            "id": f"{tok.id:024x}",
            "name": tok.user,
            "fullname": tok.user,
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": f"token {tok.id}", "role": role}},
        }
    )
