"""`tinyseek serve`: an OpenAI-compatible HTTP server and a playground page that shows each token's experts."""
