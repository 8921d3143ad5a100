"""The serving program: an OpenAI-compatible Ray Serve application (RayService import_path)."""
