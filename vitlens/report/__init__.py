"""Results → the paper's tables and figures.

- `results.open_results(dir)`: DuckDB connection with views tokens, images, params, runs, rejects
- `queries`: the SQL files of queries/ (`list_queries`, `find_query`, `run_query`, formatting)
- `statistics`: the paper's tests on stats-query results (Wilcoxon vs twin, permutation tests)
- `figures`: matplotlib figures per query (`FIGURES`, `draw_figure`)
- `html`: one HTML page and one Markdown file from report sections
- `build.build_report(results, out)`: everything above into one folder with index.html
"""
