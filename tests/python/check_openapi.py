"""Validates an OpenAPI document with openapi-spec-validator, printing every error (not only
the first), one per line, and exits non-zero when there is any.

    check_openapi.py FILE
"""

import json
import sys

from openapi_spec_validator import OpenAPIV31SpecValidator, OpenAPIV30SpecValidator

with open(sys.argv[1], encoding="utf-8") as f:
    spec = json.load(f)
validator = (OpenAPIV31SpecValidator if spec.get("openapi", "").startswith("3.1") else OpenAPIV30SpecValidator)(spec)
errors = list(validator.iter_errors())
for error in errors:
    where = "/".join(str(p) for p in error.absolute_path)
    print(f"{where}: {error.message}")
print(f"{len(errors)} errors")
sys.exit(1 if errors else 0)
