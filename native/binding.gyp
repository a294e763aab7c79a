{
  "targets": [
    {
      "target_name": "strata_native",
      "sources": ["strata.c"],
      "cflags": ["-O2", "-Wall", "-Wextra", "-Werror"]
    }
  ]
}
