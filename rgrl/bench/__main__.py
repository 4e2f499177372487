from rgrl.bench import main

main()
