"""The AUTOMATIC1111 API (`/sdapi/v1`): a front door onto the same engine."""
